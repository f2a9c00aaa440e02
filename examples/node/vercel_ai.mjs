// The Vercel AI SDK (`ai` + `@ai-sdk/openai`) against Bastion.
//
// generateText and streamText on the Responses API (the provider's default) and on
// Chat Completions. Run it against `make demo`, with the two variables the demo prints:
//
//   export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
//   cd examples/node && npm ci && node vercel_ai.mjs
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, streamText } from 'ai';

const MODEL = 'gpt-oss-120b';
const PROMPT = 'Reply with: ok';

// Both variables are required, so a forgotten base URL never sends the key elsewhere.
function settings() {
  const missing = ['OPENAI_BASE_URL', 'OPENAI_API_KEY'].filter((v) => !process.env[v]);
  if (missing.length) {
    console.error(`set ${missing.join(' and ')} (\`make demo\` prints them)`);
    process.exit(2);
  }
  return { baseURL: process.env.OPENAI_BASE_URL, apiKey: process.env.OPENAI_API_KEY };
}

// Print one answer; an empty one is a failure.
function show(label, text) {
  console.log(`${label}: ${text}`);
  if (!text.trim()) throw new Error(`${label}: empty answer`);
}

// streamText reports errors to onError and ends the stream quietly: rethrow them.
async function streamed(options) {
  let failure;
  const result = streamText({ ...options, onError: ({ error }) => { failure = error; } });
  let text = '';
  for await (const delta of result.textStream) text += delta;
  if (failure) throw failure;
  return text;
}

async function main() {
  const openai = createOpenAI(settings());
  // Bastion keeps no conversation state: store: false on the Responses API.
  const common = {
    prompt: PROMPT, maxOutputTokens: 32, maxRetries: 0,
    providerOptions: { openai: { store: false } },
  };

  const responses = openai.responses(MODEL);
  show('responses', (await generateText({ model: responses, ...common })).text);
  show('responses (stream)', await streamed({ model: responses, ...common }));

  const chat = openai.chat(MODEL);
  show('chat', (await generateText({ model: chat, ...common })).text);
  show('chat (stream)', await streamed({ model: chat, ...common }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
