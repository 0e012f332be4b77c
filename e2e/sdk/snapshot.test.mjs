// Snapshots, forks and pause to disk through the real SDK: a Python
// process holding state in memory is saved, restored, forked and paused,
// and every copy continues it on its own.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, withSandbox, waitFor } from './helpers.mjs'

const api = process.env.E2B_API_URL
const key = process.env.E2B_API_KEY

// A counter that lives only in a Python process's memory, served on
// localhost:8000: /get reads it, /inc adds one.
const counterServer = `
import http.server
state = {"n": 0}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/inc":
            state["n"] += 1
        body = str(state["n"]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", 8000), H).serve_forever()
`

async function counter(sbx, op = 'get') {
  const r = await sbx.commands.run(`curl -sf http://127.0.0.1:8000/${op}`)
  return Number(r.stdout)
}

async function startCounter(sbx, n) {
  await sbx.files.write('/tmp/counter.py', counterServer)
  await sbx.commands.run('python3 /tmp/counter.py', { background: true })
  await waitFor(async () => (await counter(sbx)) === 0, { what: 'the counter server' })
  for (let i = 0; i < n; i++) await counter(sbx, 'inc')
  assert.equal(await counter(sbx), n)
}

function killAll(t, sbxs) {
  t.after(() => Promise.all(sbxs.filter((s) => s instanceof Sandbox).map((s) => s.kill().catch(() => {}))))
}

async function raw(method, path, body) {
  const res = await fetch(api + path, { method, body, headers: { 'X-API-KEY': key, 'Content-Type': 'application/json' } })
  const text = await res.text()
  let json
  try { json = JSON.parse(text) } catch { json = undefined }
  return { status: res.status, json, text }
}

test('a snapshot continues its processes in new sandboxes, and forks diverge', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await startCounter(sbx, 3)
    await sbx.files.write('/home/user/note', 'from the source')

    const name = `snap-${Date.now()}`
    const snap = await Sandbox.createSnapshot(sbx.sandboxId, { name })
    assert.equal(snap.snapshotId, `${name}:default`)
    assert.deepEqual(snap.names, [`${name}:default`])
    // The source runs on, and what it does next is its own.
    assert.equal(await counter(sbx, 'inc'), 4)

    const listed = []
    for (const p = Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }); p.hasNext;) listed.push(...await p.nextItems())
    assert.ok(listed.some((s) => s.snapshotId === snap.snapshotId), JSON.stringify(listed))

    const copy = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
    killAll(t, [copy])
    assert.notEqual(copy.sandboxId, sbx.sandboxId)
    assert.equal(await counter(copy), 3, 'the copy continues the snapshot\'s process')
    assert.equal(await copy.files.read('/home/user/note'), 'from the source')
    assert.equal((await copy.commands.run('echo $E2B_SANDBOX_ID')).stdout.trim(), copy.sandboxId)

    const forks = await copy.fork({ count: 5, timeoutMs: 120_000 })
    killAll(t, forks)
    assert.equal(forks.length, 5)
    const ids = new Set([sbx.sandboxId, copy.sandboxId])
    for (const [i, f] of forks.entries()) {
      assert.ok(f instanceof Sandbox, `fork ${i}: ${f}`)
      assert.ok(!ids.has(f.sandboxId), 'a fork has its own ID')
      ids.add(f.sandboxId)
      assert.equal(await counter(f), 3, `fork ${i} continues with the state`)
      for (let j = 0; j <= i; j++) await counter(f, 'inc')
      await f.files.write('/home/user/note', `fork ${i}`)
    }
    for (const [i, f] of forks.entries()) {
      assert.equal(await counter(f), 3 + i + 1, `fork ${i} diverged on its own`)
      assert.equal(await f.files.read('/home/user/note'), `fork ${i}`)
    }
    assert.equal(await counter(copy), 3, 'forking left the forked sandbox as it was')
    assert.equal(await counter(sbx), 4)

    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
    await assert.rejects(Sandbox.create(snap.snapshotId, { timeoutMs: 10_000 }), /not found/i)
    // Sandboxes made from it keep running.
    assert.equal(await counter(copy), 3)
  })
})

test('pause writes the sandbox to disk; memory false keeps only its files', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await startCounter(sbx, 2)
    await sbx.files.write('/home/user/kept', 'kept')
    assert.equal(await sbx.pause(), true)
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
    let back = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
    assert.equal(await counter(back), 2, 'the process came back with its memory')

    assert.equal(await Sandbox.pause(sbx.sandboxId, { keepMemory: false }), true)
    back = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
    assert.equal(await back.files.read('/home/user/kept'), 'kept')
    const r = await back.commands.run('curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:8000/get || true')
    assert.equal(r.stdout, '000', 'a process survived a pause without memory')
    assert.equal((await back.commands.run('echo $E2B_SANDBOX_ID')).stdout.trim(), sbx.sandboxId)
  })
})

test('snapshot and fork refuse bad input in E2B\'s error shape', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    const cases = [
      ['fork count 0', 'POST', `/sandboxes/${sbx.sandboxId}/fork`, '{"count":0}', 400],
      ['fork count 101', 'POST', `/sandboxes/${sbx.sandboxId}/fork`, '{"count":101}', 400],
      ['fork of an unknown sandbox', 'POST', '/sandboxes/aaaaaaaaaaaaaaaaaaaa/fork', '{}', 404],
      ['snapshot of an unknown sandbox', 'POST', '/sandboxes/aaaaaaaaaaaaaaaaaaaa/snapshots', '{}', 404],
      ['snapshot with a bad name', 'POST', `/sandboxes/${sbx.sandboxId}/snapshots`, '{"name":"no spaces"}', 400],
      ['snapshot named as a template', 'POST', `/sandboxes/${sbx.sandboxId}/snapshots`, '{"name":"base"}', 400],
      ['create from an unknown snapshot', 'POST', '/v2/sandboxes', '{"templateID":"aaaaaaaaaaaaaaaaaaaa:default"}', 404],
      ['delete an unknown snapshot', 'DELETE', '/templates/aaaaaaaaaaaaaaaaaaaa', undefined, 404],
      ['bad list limit', 'GET', '/snapshots?limit=0', undefined, 400],
    ]
    for (const [what, method, path, body, want] of cases) {
      const r = await raw(method, path, body)
      assert.equal(r.status, want, `${what}: ${r.text}`)
      assert.equal(r.json?.code, want, `${what}: error shape ${r.text}`)
      assert.equal(typeof r.json?.message, 'string', `${what}: ${r.text}`)
    }
    const listed = await raw('GET', `/snapshots?sandboxID=${sbx.sandboxId}`)
    assert.deepEqual(listed.json, [], 'a refused snapshot left one behind')
  })
})

// fetchPort sends a request through the proxy to a port of a sandbox.
async function fetchPort(id, port, path) {
  const res = await fetch(process.env.E2B_SANDBOX_URL + path, { headers: { 'E2b-Sandbox-Id': id, 'E2b-Sandbox-Port': String(port) } })
  return { status: res.status, text: await res.text() }
}

test('autoResume: a sandbox paused at its timeout wakes on traffic through the proxy and on connect', async (t) => {
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000, lifecycle: { onTimeout: 'pause', autoResume: true } })
  t.after(() => sbx.kill().catch(() => {}))
  await sbx.files.write('/tmp/www/hello.txt', 'hello through the proxy')
  const server = await sbx.commands.run('python3 -m http.server 8000 --directory /tmp/www', { background: true })
  await waitFor(async () => (await fetchPort(sbx.sandboxId, 8000, '/hello.txt')).status === 200, { what: 'the web server' })
  // The handle's stream is traffic too: it would wake the sandbox the
  // moment it pauses.
  await server.disconnect()

  await sbx.setTimeout(1_000)
  await waitFor(async () => (await Sandbox.getInfo(sbx.sandboxId)).state === 'paused', { timeoutMs: 30_000, what: 'the pause at timeout' })
  const woken = await fetchPort(sbx.sandboxId, 8000, '/hello.txt')
  assert.equal(woken.status, 200, woken.text)
  assert.equal(woken.text, 'hello through the proxy', 'the server process came back with the sandbox')
  assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'running')

  assert.equal(await sbx.pause(), true)
  const back = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 60_000 })
  assert.equal((await fetchPort(back.sandboxId, 8000, '/hello.txt')).status, 200)
})

test('a sandbox paused at its timeout without its memory wakes only on connect', async (t) => {
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000, lifecycle: { onTimeout: { action: 'pause', keepMemory: false } } })
  t.after(() => sbx.kill().catch(() => {}))
  await sbx.files.write('/home/user/kept', 'files only')
  await sbx.setTimeout(1_000)
  await waitFor(async () => (await Sandbox.getInfo(sbx.sandboxId)).state === 'paused', { timeoutMs: 30_000, what: 'the pause at timeout' })
  const r = await fetchPort(sbx.sandboxId, 49983, '/health')
  assert.equal(r.status, 502, r.text)
  assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused', 'traffic woke it')
  const back = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 60_000 })
  assert.equal(await back.files.read('/home/user/kept'), 'files only')
})
