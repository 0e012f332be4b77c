// Timeouts, expiry, kill during a stream, metrics, pause/resume, and bad input.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, withSandbox, sleep, waitFor } from './helpers.mjs'

const api = process.env.E2B_API_URL
const key = process.env.E2B_API_KEY

test('setTimeout moves the end time, and the sandbox expires', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await sbx.setTimeout(3_000)
    const info = await sbx.getInfo()
    assert.ok(info.endAt.getTime() - Date.now() < 4_000)
    await waitFor(async () => !(await sbx.isRunning()), { timeoutMs: 15_000, what: 'expiry' })
    await assert.rejects(Sandbox.getInfo(sbx.sandboxId), /not found/i)
  })
})

test('kill while a command streams cuts the stream', async (t) => {
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000 })
  let chunks = 0
  const h = await sbx.commands.run('while true; do echo tick; sleep 0.05; done', { background: true, onStdout: () => { chunks++ } })
  await waitFor(() => chunks > 2, { what: 'streaming output' })
  await sbx.kill()
  await assert.rejects(h.wait())
  assert.equal(await sbx.isRunning(), false)
})

test('getMetrics reports real figures', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await sbx.commands.run('head -c 20000000 /dev/urandom > /tmp/ballast; python3 -c "sum(range(3_000_000))"')
    // Metrics are samples (a fresh one at most a second old): the write may
    // land just after the newest, so poll briefly for it to show.
    let ms
    await waitFor(async () => {
      ms = await sbx.getMetrics()
      return ms.length >= 1 && ms.at(-1).diskUsed >= 20_000_000
    }, { timeoutMs: 10_000, stepMs: 500, what: 'a metrics sample with the written data' })
    const m = ms.at(-1)
    assert.ok(m.cpuCount > 0)
    assert.ok(m.memTotal > 0 && m.memUsed > 0 && m.memUsed <= m.memTotal, JSON.stringify(m))
    assert.ok(m.diskUsed >= 20_000_000, `diskUsed ${m.diskUsed}`)
    assert.ok(m.diskTotal > m.diskUsed)
    assert.ok(m.cpuUsedPct >= 0 && m.cpuUsedPct <= 100)
  })
})

test('pause and resume keep files, processes and memory', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await sbx.files.write('/tmp/kept', 'kept across pause')
    const h = await sbx.commands.run('python3 -c "import time\nn=0\nwhile True:\n  n+=1; open(\'/tmp/n\',\'w\').write(str(n)); time.sleep(0.05)"', { background: true })
    await sleep(300)
    assert.equal(await sbx.pause(), true)
    assert.equal(await sbx.pause(), false, 'already paused')
    assert.equal(await sbx.isRunning(), false)
    const paused = await Sandbox.getInfo(sbx.sandboxId)
    assert.equal(paused.state, 'paused')

    const back = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 60_000 })
    assert.equal(await back.isRunning(), true)
    assert.equal(await back.files.read('/tmp/kept'), 'kept across pause')
    const n1 = Number(await back.files.read('/tmp/n'))
    await sleep(300)
    const n2 = Number(await back.files.read('/tmp/n'))
    assert.ok(n2 > n1, `counter did not resume: ${n1} → ${n2}`)
    const procs = await back.commands.list()
    assert.ok(procs.some((p) => p.pid === h.pid), 'background process survived the pause')
  })
})

async function raw(method, path, { body, headers = {} } = {}) {
  const res = await fetch(api + path, { method, body, headers: { 'X-API-KEY': key, ...headers } })
  const text = await res.text()
  let json
  try { json = JSON.parse(text) } catch { json = undefined }
  return { status: res.status, json, text }
}

test('bad input gets the protocol\'s errors and the server keeps serving', async (t) => {
  const cases = [
    ['malformed JSON', 'POST', '/v2/sandboxes', { body: '{"templateID": ', headers: { 'Content-Type': 'application/json' } }, 400],
    ['metadata not strings', 'POST', '/v2/sandboxes', { body: '{"templateID":"base","metadata":{"a":1}}' }, 400],
    ['no template', 'POST', '/v2/sandboxes', { body: '{}' }, 400],
    ['unknown template', 'POST', '/v2/sandboxes', { body: '{"templateID":"no-such-template"}' }, 404],
    ['negative timeout', 'POST', '/v2/sandboxes', { body: '{"templateID":"base","timeout":-5}' }, 400],
    ['oversized timeout', 'POST', '/v2/sandboxes', { body: '{"templateID":"base","timeout":999999999}' }, 400],
    ['missing API key', 'GET', '/v2/sandboxes', { headers: { 'X-API-KEY': '' } }, 401],
    ['wrong API key', 'GET', '/v2/sandboxes', { headers: { 'X-API-KEY': 'e2b_0000' } }, 401],
    ['unknown sandbox', 'GET', '/sandboxes/aaaaaaaaaaaaaaaaaaaa', {}, 404],
    ['kill unknown sandbox', 'DELETE', '/sandboxes/aaaaaaaaaaaaaaaaaaaa', {}, 404],
    ['bad list state', 'GET', '/v2/sandboxes?state=sleeping', {}, 400],
    ['bad list limit', 'GET', '/v2/sandboxes?limit=0', {}, 400],
  ]
  for (const [name, method, path, opts, want] of cases) {
    const r = await raw(method, path, opts)
    assert.equal(r.status, want, `${name}: ${r.text}`)
    assert.equal(r.json?.code, want, `${name}: error shape ${r.text}`)
    assert.equal(typeof r.json?.message, 'string', `${name}: error shape ${r.text}`)
  }
  await assert.rejects(Sandbox.create('base', { apiKey: 'e2b_0123', timeoutMs: 10_000 }), (e) => e.name === 'AuthenticationError')

  // The proxy's own errors.
  const proxied = await fetch(process.env.E2B_SANDBOX_URL + '/health', { headers: { 'E2b-Sandbox-Id': 'aaaaaaaaaaaaaaaaaaaa', 'E2b-Sandbox-Port': '49983' } })
  assert.equal(proxied.status, 502)
  assert.deepEqual(await proxied.json(), { sandboxId: 'aaaaaaaaaaaaaaaaaaaa', message: 'The sandbox was not found', code: 502 })

  await withSandbox(t, {}, async (sbx) => {
    const closed = await fetch(process.env.E2B_SANDBOX_URL + '/', { headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '8999' } })
    assert.equal(closed.status, 502)
    assert.equal((await closed.json()).message, 'The sandbox is running but port is not open')
    // ../../etc is a path like any other inside the sandbox: it resolves
    // against the home dir and cannot leave the sandbox's own filesystem.
    const passwd = await sbx.files.read('../../etc/passwd')
    assert.match(passwd, /^user:x:1000:/m)
    assert.doesNotMatch(passwd, /^cubicle-host-marker/m)
    const r = await sbx.commands.run('echo fine')
    assert.equal(r.stdout, 'fine\n')
  })
})
