'use strict';
// notes-node: the notes app (examples/README.md) in Node.js, standard library only (Node 18+).
// A tiny single-tenant notes service that knows nothing about tenants: tenement runs one copy
// per tenant and gives each its own DATA_DIR.
//
// Listening, first match wins:
//   LISTEN_FDS + LISTEN_PID=<this pid>  serve on the inherited socket, fd 3 (socket activation)
//   SOCKET_PATH=/path                   bind this Unix stream socket
//   HOST (127.0.0.1) and PORT (8000)    bind TCP
// DATA_DIR (./data) holds notes.jsonl and token. NOTIFY_SOCKET is not supported: Node has no
// Unix datagram sockets, so use ready = "tcp" or "health" for this app.
//
// Routes: GET /health, GET /token, GET and POST /notes (Authorization: Bearer <token>), GET /.
const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');

const MAX_BODY = 64 * 1024; // bytes; a note is text, not an upload
const RUNTIME = 'node';
// Longer than Node's 5 s default, so that the proxy's pooled connections outlive short pauses
// between requests.
const KEEP_ALIVE_MS = 30 * 1000;
const TEXT = 'text/plain; charset=utf-8';
const JSON_TYPE = 'application/json';
const HELP = `notes: a single-tenant notes service (examples/README.md)
GET  /health  status, runtime, service and tenant (JSON)
GET  /token   this tenant's bearer token
GET  /notes   the notes (JSON); needs Authorization: Bearer <token>
POST /notes   add the body as a note; needs Authorization: Bearer <token>
`;
// Path -> methods it answers; anything else is 404, or 405 with Allow.
const ROUTES = new Map([
  ['/', ['GET', 'HEAD']],
  ['/health', ['GET', 'HEAD']],
  ['/token', ['GET', 'HEAD']],
  ['/notes', ['GET', 'HEAD', 'POST']],
]);
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** An answer other than success: status, one-line message, extra headers. */
class HttpError extends Error {
  constructor(status, message, headers = {}) {
    super(message);
    this.status = status;
    this.headers = headers;
  }
}

/** This tenant's bearer token: made once, kept in $DATA_DIR/token (0600, atomic). */
function loadToken(dataDir) {
  const file = path.join(dataDir, 'token');
  try {
    const token = fs.readFileSync(file, 'ascii').trim();
    if (token.length === 64) return token;
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
  const token = crypto.randomBytes(32).toString('hex');
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, 'w', 0o600);
  try {
    fs.writeSync(fd, `${token}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  return token;
}

/** Makes new directory entries (the token's rename, a new notes.jsonl) durable. */
function syncDir(dir) {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The notes: $DATA_DIR/notes.jsonl, one {"id","text","created"} object per line, oldest first.
 * Note N is line N, so the next id is the line count plus one. Appends go one at a time, in
 * order, and each is fsynced before it counts; `size` is the length of the counted lines.
 */
class NotesStore {
  static async open(dataDir) {
    const file = path.join(dataDir, 'notes.jsonl');
    const handle = await fs.promises.open(file, 'a+', 0o600);
    let data = await handle.readFile();
    const end = data.lastIndexOf(0x0a) + 1;
    if (end < data.length) {
      // A crash in the middle of an append: that note was never acknowledged.
      console.error(`notes: dropping an incomplete last line of ${file}`);
      await handle.truncate(end);
      data = data.subarray(0, end);
    }
    let count = 0;
    for (let i = data.indexOf(0x0a); i !== -1; i = data.indexOf(0x0a, i + 1)) count++;
    return new NotesStore(handle, count, end);
  }

  constructor(handle, count, size) {
    this.handle = handle;
    this.count = count;
    this.size = size;
    this.queue = Promise.resolve();
  }

  /** Appends a note once the appends before it are done; resolves to its id. */
  add(text) {
    const added = this.queue.then(() => this.append(text));
    this.queue = added.catch(() => {}); // a failed append must not stop the ones after it
    return added;
  }

  async append(text) {
    const note = { id: this.count + 1, text, created: utcNow() };
    const line = Buffer.from(`${JSON.stringify(note)}\n`);
    try {
      await this.handle.appendFile(line);
      await this.handle.sync();
    } catch (err) {
      // Leave no partial or unacknowledged line behind: the next note gets this id.
      await this.handle.truncate(this.size).catch(() => {});
      throw err;
    }
    this.size += line.length;
    this.count += 1;
    return note.id;
  }

  /** The notes as a JSON array, ready to send. */
  async json() {
    const size = this.size; // only appends completed by now; one may be under way past it
    const data = Buffer.alloc(size);
    await this.handle.read(data, 0, size, 0);
    // Each line is already a note in JSON, and JSON.stringify escapes newlines in the text:
    // the array is the lines joined with commas.
    return size ? `[${data.toString('utf8', 0, size - 1).replaceAll('\n', ',')}]\n` : '[]\n';
  }
}

/** The current UTC time as 2026-11-23T10:00:00Z. */
function utcNow() {
  return `${new Date().toISOString().slice(0, 19)}Z`;
}

function toJson(value) {
  return `${JSON.stringify(value)}\n`;
}

async function route(app, req, res) {
  const target = req.url.split('?', 1)[0];
  const methods = ROUTES.get(target);
  if (!methods) throw new HttpError(404, 'not found');
  if (!methods.includes(req.method)) {
    throw new HttpError(405, 'method not allowed', { Allow: methods.join(', ') });
  }
  if (target === '/health') {
    send(req, res, 200, app.health, JSON_TYPE);
  } else if (target === '/token') {
    send(req, res, 200, `${app.token}\n`);
  } else if (target === '/') {
    send(req, res, 200, HELP);
  } else if (req.method === 'POST') {
    authenticate(req, app.tokenBytes);
    await addNote(app.store, req, res);
  } else {
    authenticate(req, app.tokenBytes);
    send(req, res, 200, await app.store.json(), JSON_TYPE);
  }
}

function authenticate(req, token) {
  const header = (req.headers.authorization || '').trim();
  const space = header.indexOf(' ');
  const scheme = space === -1 ? header : header.slice(0, space);
  const given = space === -1 ? '' : header.slice(space + 1).trim();
  if (scheme.toLowerCase() !== 'bearer' || !given) {
    const message = 'authorization required: Authorization: Bearer <token from /token>';
    throw new HttpError(401, message, { 'WWW-Authenticate': 'Bearer realm="notes"' });
  }
  const bytes = Buffer.from(given);
  // timingSafeEqual wants equal lengths; the length is no secret (always 64).
  if (bytes.length !== token.length || !crypto.timingSafeEqual(bytes, token)) {
    throw new HttpError(403, 'this token does not open these notes');
  }
}

async function addNote(store, req, res) {
  // Node's parser has already refused a malformed Content-Length (see onClientError).
  if (req.headers['transfer-encoding'] !== undefined) {
    throw new HttpError(400, 'chunked bodies are not supported; send Content-Length');
  }
  if (Number(req.headers['content-length'] || 0) > MAX_BODY) {
    throw new HttpError(413, `note too large (max ${MAX_BODY} bytes)`);
  }
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  let text;
  try {
    text = utf8.decode(Buffer.concat(chunks)).trim();
  } catch {
    throw new HttpError(400, 'the note must be UTF-8 text');
  }
  if (!text) throw new HttpError(400, 'empty note; send the text as the request body');
  const id = await store.add(text);
  send(req, res, 201, toJson({ id }), JSON_TYPE, { Location: `/notes/${id}` });
}

/** Sends a whole response (HEAD: the headers only) and logs the request on stdout. */
function send(req, res, status, body, type = TEXT, headers = {}) {
  const data = Buffer.from(body);
  res.writeHead(status, {
    'Content-Type': type,
    'Content-Length': data.length,
    ...headers,
    // Before the next request on this connection Node reads and drops whatever is left of
    // this one's body. Fine for a small one; a chunked or oversized one could be anything.
    ...(unboundedBody(req) && { Connection: 'close' }),
  });
  res.end(req.method === 'HEAD' ? undefined : data);
  const client = req.socket.remoteAddress || 'unix';
  const line = JSON.stringify(`${req.method} ${req.url} HTTP/${req.httpVersion}`);
  process.stdout.write(`${client} ${line} ${status} ${data.length}\n`);
}

function unboundedBody(req) {
  const length = Number(req.headers['content-length']);
  return req.headers['transfer-encoding'] !== undefined || length > MAX_BODY;
}

async function handle(app, req, res) {
  try {
    await route(app, req, res);
  } catch (err) {
    if (err instanceof HttpError) {
      send(req, res, err.status, `${err.message}\n`, TEXT, err.headers);
      return;
    }
    // A bug, a failed write, or a client gone in the middle of its body ("aborted").
    console.error(`error: ${req.method} ${req.url}: ${err.message}`);
    if (res.headersSent || req.socket.destroyed) res.destroy();
    else send(req, res, 500, 'internal error\n');
  }
}

// Requests Node's parser refuses never reach the handler; answer them in the same style.
const PARSE_ERRORS = {
  HPE_INVALID_CONTENT_LENGTH: [400, 'bad Content-Length'],
  HPE_UNEXPECTED_CONTENT_LENGTH: [400, 'bad Content-Length'],
  HPE_INVALID_TRANSFER_ENCODING: [400, 'bad Transfer-Encoding'],
  HPE_HEADER_OVERFLOW: [431, 'request header fields too large'],
  ERR_HTTP_REQUEST_TIMEOUT: [408, 'request timeout'],
};

function onClientError(err, socket) {
  // A client gone in the middle of a request: nobody to answer.
  if (err.code === 'ECONNRESET' || err.code === 'HPE_INVALID_EOF_STATE' || !socket.writable) {
    socket.destroy();
    return;
  }
  const [status, message] = PARSE_ERRORS[err.code] || [400, 'malformed request'];
  const body = `${message}\n`;
  socket.end(
    `HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: ${TEXT}\r\n` +
      `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
  );
  process.stdout.write(`${socket.remoteAddress || 'unix'} - ${status} (${err.code})\n`);
}

/**
 * Where to listen, in the contract's order: [listen() argument, socket file we own or null].
 */
function listenTarget(env) {
  if (Number(env.LISTEN_FDS) >= 1 && env.LISTEN_PID === String(process.pid)) {
    // Do not leak them to anything we might run.
    delete env.LISTEN_FDS;
    delete env.LISTEN_PID;
    delete env.LISTEN_FDNAMES;
    return [{ fd: 3 }, null];
  }
  if (env.SOCKET_PATH) {
    try {
      fs.unlinkSync(env.SOCKET_PATH); // a stale socket from a previous run
    } catch (err) {
      if (err.code !== 'ENOENT') throw err;
    }
    return [{ path: env.SOCKET_PATH }, env.SOCKET_PATH];
  }
  const port = env.PORT || '8000';
  if (!/^\d+$/.test(port) || Number(port) > 65535) {
    throw new Error(`PORT must be a port number, got ${JSON.stringify(port)}`);
  }
  return [{ host: env.HOST || '127.0.0.1', port: Number(port) }, null];
}

function describe(server, target) {
  const address = server.address();
  let where;
  // A Unix socket inherited as fd 3 has no known path: address() is null.
  if (typeof address === 'string') where = `unix:${address}`;
  else if (address && address.address.includes(':')) where = `[${address.address}]:${address.port}`;
  else if (address) where = `${address.address}:${address.port}`;
  else where = 'unix';
  return target.fd === undefined ? where : `fd ${target.fd} (${where})`;
}

async function main() {
  let socketFile = null;
  const stop = () => {
    // At once: no waiting for kept-alive connections to go idle.
    if (socketFile) fs.rmSync(socketFile, { force: true });
    process.stdout.write('notes stopped\n');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  const dataDir = path.resolve(process.env.DATA_DIR || './data');
  fs.mkdirSync(dataDir, { recursive: true });
  const store = await NotesStore.open(dataDir);
  const token = loadToken(dataDir);
  syncDir(dataDir);
  const app = {
    store,
    token,
    tokenBytes: Buffer.from(token),
    health: toJson({
      status: 'ok',
      runtime: RUNTIME,
      service: process.env.TENEMENT_SERVICE ?? null,
      tenant: process.env.TENEMENT_ID ?? null,
    }),
  };

  // Node 20 answers an HTTP/1.1 request without Host itself, with an empty body; Node 18 (and
  // the Python app) serve it: do the same on both.
  const options = { requireHostHeader: false };
  const server = http.createServer(options, (req, res) => handle(app, req, res));
  server.keepAliveTimeout = KEEP_ALIVE_MS;
  server.on('clientError', onClientError);
  const [target, file] = listenTarget(process.env);
  socketFile = file;
  server.on('error', (err) => {
    console.error(`notes: cannot listen: ${err.message}`);
    process.exit(1);
  });
  server.listen(target, () => {
    process.stdout.write(`notes listening on ${describe(server, target)} (data in ${dataDir})\n`);
  });
}

main().catch((err) => {
  console.error(`notes: cannot start: ${err.message}`);
  process.exit(1);
});
