import OpenAI from "openai";

const client = new OpenAI({
  baseURL: "https://api.qubittron.ai/v1",
  apiKey: process.env.QUBITTRON_API_KEY,
});

const res = await client.responses.create({
  model: "gpt-oss-120b",
  input: "Reply with: ok",
  max_output_tokens: 32,
  store: false,
});
console.log(res.output_text);
