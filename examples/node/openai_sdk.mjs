// The official `openai` SDK for Node against Bastion.
//
// Responses and Chat Completions, each once whole and once streamed. Run it against
// `make demo`, with the two variables the demo prints:
//
//   export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
//   cd examples/node && npm ci && node openai_sdk.mjs
import OpenAI from 'openai';

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

async function main() {
  const client = new OpenAI({ ...settings(), maxRetries: 0, timeout: 30_000 });

  // Responses API. Bastion keeps no conversation state: send store: false.
  const response = await client.responses.create({
    model: MODEL, input: PROMPT, max_output_tokens: 32, store: false,
  });
  show('responses', response.output_text);

  let text = '';
  const stream = await client.responses.create({
    model: MODEL, input: PROMPT, max_output_tokens: 32, store: false, stream: true,
  });
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta') text += event.delta;
    else if (event.type === 'error' || event.type === 'response.failed') {
      throw new Error(`responses (stream): ${JSON.stringify(event)}`);
    }
  }
  show('responses (stream)', text);

  // Chat Completions.
  const messages = [{ role: 'user', content: PROMPT }];
  const completion = await client.chat.completions.create({
    model: MODEL, messages, max_completion_tokens: 32,
  });
  show('chat', completion.choices[0].message.content ?? '');

  text = '';
  const chunks = await client.chat.completions.create({
    model: MODEL, messages, max_completion_tokens: 32, stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of chunks) text += chunk.choices[0]?.delta?.content ?? '';
  show('chat (stream)', text);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
