// The official `openai` npm package as a client of affinity-node (tests/integration/test_node_sdk.py).
// Env: BASE_URLS (comma-separated /v1 URLs, one per node), API_KEY, MODEL.
// Prints one JSON line with what it saw; any error exits non-zero with the reason on stderr.
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

const urls = (process.env.BASE_URLS ?? '').split(',').filter(Boolean);
const apiKey = process.env.API_KEY;
const model = process.env.MODEL ?? 'llama-3.1-8b';
if (urls.length < 3 || !apiKey) {
  throw new Error('BASE_URLS (3 or more, comma-separated) and API_KEY are required');
}
// maxRetries 0: a retry would hide the node's first answer; the timeout bounds every call.
const clients = urls.map((baseURL) => new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 }));
const instructions = 'You are a coding agent working in a large repository. '.repeat(4);

/** Where a response came from: the node that took it and the backend that served it. */
function seen(response) {
  return {
    node: response.headers.get('x-affinity-node'),
    backend: response.headers.get('x-backend-id'),
    affinity: response.headers.get('x-affinity'),
  };
}

async function chat(client) {
  const { data, response } = await client.chat.completions
    .create({ model, messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 8 })
    .withResponse();
  return { ...seen(response), text: data.choices[0].message.content, id: data.id };
}

async function chatStream(client) {
  const { data: stream, response } = await client.chat.completions
    .create({
      model,
      messages: [{ role: 'user', content: 'Say hello.' }],
      max_tokens: 8,
      stream: true,
      stream_options: { include_usage: true },
    })
    .withResponse();
  let text = '';
  let chunks = 0;
  let usage = null;
  for await (const chunk of stream) {
    chunks += 1;
    text += chunk.choices[0]?.delta?.content ?? '';
    usage = chunk.usage ?? usage;
  }
  return { ...seen(response), text, chunks, completion_tokens: usage?.completion_tokens ?? null };
}

async function turn(client, input, previous, stream) {
  const params = { model, instructions, input, max_output_tokens: 8 };
  if (previous) params.previous_response_id = previous;
  if (!stream) {
    const { data, response } = await client.responses.create(params).withResponse();
    return { ...seen(response), id: data.id, status: data.status, text: data.output_text, stream };
  }
  const { data: events, response } = await client.responses
    .create({ ...params, stream: true })
    .withResponse();
  const ids = new Set();
  let text = '';
  let status = null;
  for await (const event of events) {
    if ('response' in event) ids.add(event.response.id); // created, in_progress, completed, ...
    if (event.type === 'response.output_text.delta') text += event.delta;
    if (event.type === 'response.completed' || event.type === 'response.incomplete') {
      status = event.response.status;
    }
  }
  if (!status) throw new Error('the stream ended without response.completed or .incomplete');
  if (ids.size !== 1) throw new Error(`the stream named ${ids.size} response ids`);
  return { ...seen(response), id: [...ids][0], status, text, stream };
}

async function chain() {
  const turns = [];
  let previous = null;
  for (const [i, stream] of [false, true, false].entries()) {
    const t = await turn(clients[i % clients.length], `turn ${i}: fix the failing test`, previous, stream);
    turns.push(t);
    previous = t.id;
  }
  return turns;
}

async function retrieve(client, id) {
  const { data, response } = await client.responses.retrieve(id).withResponse();
  return { ...seen(response), id: data.id, status: data.status };
}

async function embeddings(client) {
  // The SDK asks for base64 by default and decodes it to floats.
  const { data, response } = await client.embeddings
    .create({ model, input: ['affinity', 'routing'] })
    .withResponse();
  return { ...seen(response), count: data.data.length, dims: data.data.map((d) => d.embedding.length) };
}

async function main() {
  const result = { sdk_version: VERSION, node_version: process.version };
  result.chat = await chat(clients[0]);
  result.chat_stream = await chatStream(clients[1]);
  result.chain = await chain();
  result.retrieved = await retrieve(clients[0], result.chain.at(-1).id);
  result.embeddings = await embeddings(clients[2]);
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
  const detail = err instanceof OpenAI.APIError ? ` (status ${err.status}: ${JSON.stringify(err.error)})` : '';
  process.stderr.write(`${err?.stack ?? err}${detail}\n`);
  process.exit(1);
});
