const res = await fetch("https://api.qubittron.ai/v1/responses", {
  method: "POST",
  headers: {
    Authorization: `Bearer ${process.env.QUBITTRON_API_KEY}`,
    "Content-Type": "application/json",
  },
  body: JSON.stringify({
    model: "gpt-oss-120b",
    input: "Reply with: ok",
    max_output_tokens: 32,
    store: false,
  }),
});
const json = await res.json();
console.log(json);
