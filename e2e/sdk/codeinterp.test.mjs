// @e2b/code-interpreter against the code-interpreter-v1 template: cells,
// streaming, rich results, errors, contexts, env vars, bash, interrupts.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, NotFoundError, TimeoutError } from '@e2b/code-interpreter'
import { viaHost } from './helpers.mjs'

const PNG_MAGIC = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])

test('code interpreter', async (t) => {
  // No template named: the SDK's default, code-interpreter-v1.
  const sbx = await Sandbox.create({ envs: { FROM_CREATE: 'sandbox-level' }, timeoutMs: 600_000 })
  t.after(() => sbx.kill().catch(() => {}))

  await t.test('state persists across cells', async () => {
    const a = await sbx.runCode('x = 40')
    assert.equal(a.error, undefined)
    const b = await sbx.runCode('x + 2')
    assert.equal(b.text, '42')
    assert.equal(b.executionCount, a.executionCount + 1)
  })

  await t.test('stdout and stderr stream in order, before the cell ends', async () => {
    const seen = []
    const code = [
      'import sys, time',
      "print('out1', flush=True); time.sleep(0.3)",
      "print('err1', file=sys.stderr, flush=True); time.sleep(0.3)",
      "print('out2', flush=True); time.sleep(0.3)",
    ].join('\n')
    const ex = await sbx.runCode(code, {
      onStdout: (m) => seen.push({ at: Date.now(), line: `out:${m.line.trim()}` }),
      onStderr: (m) => seen.push({ at: Date.now(), line: `err:${m.line.trim()}` }),
    })
    const done = Date.now()
    assert.deepEqual(seen.map((s) => s.line), ['out:out1', 'err:err1', 'out:out2'])
    assert.deepEqual(ex.logs.stdout, ['out1\n', 'out2\n'])
    assert.deepEqual(ex.logs.stderr, ['err1\n'])
    assert.ok(done - seen[0].at >= 500, `first line arrived ${done - seen[0].at} ms before the end: not streamed`)
  })

  await t.test('a matplotlib plot comes back as a PNG', async () => {
    const ex = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [2, 4, 1])\nplt.title("t")\nplt.show()')
    assert.equal(ex.error, undefined)
    const png = ex.results.find((r) => r.png)
    assert.ok(png, `no png in ${JSON.stringify(ex.results.map((r) => r.formats()))}`)
    assert.equal(png.isMainResult, false)
    assert.ok(Buffer.from(png.png, 'base64').subarray(0, 8).equals(PNG_MAGIC))
  })

  await t.test('a pandas DataFrame comes back as HTML', async () => {
    const ex = await sbx.runCode("import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'pop': [0.7, 10.0]})")
    assert.equal(ex.results.length, 1)
    const [r] = ex.results
    assert.equal(r.isMainResult, true)
    assert.match(r.html, /<table/)
    assert.match(r.html, /Oslo/)
    assert.match(r.text, /Lima/)
    assert.ok(r.formats().includes('html'))
  })

  await t.test('an exception comes back with its traceback', async () => {
    const errors = []
    const ex = await sbx.runCode('def f(d):\n    return 1 / d\nf(0)', { onError: (e) => errors.push(e) })
    assert.equal(ex.error.name, 'ZeroDivisionError')
    assert.equal(ex.error.value, 'division by zero')
    assert.match(ex.error.traceback, /ZeroDivisionError/)
    assert.match(ex.error.traceback, /return 1 \/ d/)
    assert.equal(errors.length, 1)
    // The context survives its exceptions.
    assert.equal((await sbx.runCode('x')).text, '40')
  })

  await t.test('two contexts are isolated; restart and remove', async () => {
    const a = await sbx.createCodeContext()
    const b = await sbx.createCodeContext({ cwd: '/tmp' })
    assert.equal(a.language, 'python')
    assert.equal(b.cwd, '/tmp')
    await sbx.runCode('secret = "a"', { context: a })
    const inB = await sbx.runCode('secret', { context: b })
    assert.equal(inB.error?.name, 'NameError')
    assert.equal((await sbx.runCode('import os; os.getcwd()', { context: b })).text, '/tmp')
    assert.equal((await sbx.runCode('x', { context: a })).error?.name, 'NameError', 'the default context leaked into a new one')
    const listed = (await sbx.listCodeContexts()).map((c) => c.id)
    assert.ok(listed.includes(a.id) && listed.includes(b.id), `listed ${listed}`)

    await sbx.restartCodeContext(a)
    assert.equal((await sbx.runCode('secret', { context: a })).error?.name, 'NameError', 'state survived a restart')
    assert.equal((await sbx.runCode('1 + 1', { context: a })).text, '2')

    await sbx.removeCodeContext(b.id)
    await assert.rejects(sbx.runCode('1', { context: b }), (err) => err instanceof NotFoundError)
    assert.ok(!(await sbx.listCodeContexts()).some((c) => c.id === b.id))
  })

  await t.test('env vars per execution, and the sandbox env', async () => {
    const ex = await sbx.runCode("import os\nos.environ['PER_CELL'] + ' ' + os.environ['FROM_CREATE']", { envs: { PER_CELL: 'cell-level' } })
    assert.equal(ex.text, 'cell-level sandbox-level')
    const after = await sbx.runCode("str(os.environ.get('PER_CELL'))")
    assert.equal(after.text, 'None')
    const bash = await sbx.runCode('echo "$PER_CELL/$FROM_CREATE"', { language: 'bash', envs: { PER_CELL: 'b' } })
    assert.deepEqual(bash.logs.stdout, ['b/sandbox-level\n'])
  })

  await t.test('a bash context', async () => {
    const first = await sbx.runCode('N=6; cd /tmp; echo $((N * 7))', { language: 'bash' })
    assert.deepEqual(first.logs.stdout, ['42\n'])
    const second = await sbx.runCode('echo "$N $PWD $(whoami)"; echo oops >&2', { language: 'bash' })
    assert.deepEqual(second.logs.stdout, ['6 /tmp user\n'])
    assert.deepEqual(second.logs.stderr, ['oops\n'])
    const failed = await sbx.runCode('false', { language: 'bash' })
    assert.equal(failed.error?.value, '1')
    const own = await sbx.createCodeContext({ language: 'bash' })
    assert.equal(own.language, 'bash')
    assert.deepEqual((await sbx.runCode('echo "${N:-unset}"', { context: own })).logs.stdout, ['unset\n'])
  })

  await t.test('a 60 s loop stopped by the timeout leaves the context usable', async () => {
    const start = Date.now()
    await assert.rejects(
      sbx.runCode('import time\nfor i in range(60):\n    time.sleep(1)\nloop_finished = True', { timeoutMs: 3000 }),
      (err) => err instanceof TimeoutError,
    )
    assert.ok(Date.now() - start < 15_000, 'the timeout did not end the call')
    const next = Date.now()
    const ex = await sbx.runCode("x, 'loop_finished' in globals()")
    assert.equal(ex.text, '(40, False)')
    assert.ok(Date.now() - next < 10_000, `the next cell waited ${Date.now() - next} ms: the loop was not interrupted`)
  })

  await t.test('bad requests get the protocol errors', async () => {
    await assert.rejects(sbx.runCode('1', { context: { id: 'no-such-context', language: 'python', cwd: '/' } }),
      (err) => err instanceof NotFoundError)
    // The SDK refuses context+language itself; the server must too.
    const res = await fetch(`${process.env.E2B_SANDBOX_URL}/execute`, {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        'E2b-Sandbox-Id': sbx.sandboxId,
        'E2b-Sandbox-Port': '49999',
        'X-Access-Token': sbx.envdAccessToken ?? '',
      },
      body: JSON.stringify({ code: '1', context_id: 'x', language: 'python' }),
    })
    assert.equal(res.status, 400)
    assert.match(await res.text(), /Only one of context_id or language/)
  })

  await t.test('nobody without the access token runs code, nor a cross-site page', async () => {
    const marker = `/tmp/stranger-${Date.now()}`
    const body = JSON.stringify({ code: `open('${marker}', 'w').close()` })
    const post = (headers) => fetch(`${process.env.E2B_SANDBOX_URL}/execute`, {
      method: 'POST',
      headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49999', ...headers },
      body,
    })
    const json = { 'Content-Type': 'application/json' }
    for (const [name, headers, status] of [
      ['no token', json, 401],
      ['a wrong token', { ...json, 'X-Access-Token': 'wrong' }, 401],
      ['text/plain with the token', { 'Content-Type': 'text/plain', 'X-Access-Token': sbx.envdAccessToken }, 415],
    ]) {
      const res = await post(headers)
      assert.equal(res.status, status, `${name}: ${res.status} ${await res.text()}`)
    }
    // What a web page can send cross-site: a text/plain POST to the host
    // name, no custom headers.
    for (const headers of [{ 'content-type': 'text/plain;charset=UTF-8' }, { 'content-type': 'application/x-www-form-urlencoded' }]) {
      const res = await viaHost(sbx, 49999, { method: 'POST', path: '/execute', headers, body })
      assert.equal(res.status, 401, `cross-site ${headers['content-type']}: ${res.status} ${res.text}`)
      assert.match(res.text, /Unauthorized/)
    }
    const listed = await viaHost(sbx, 49999, { path: '/contexts', headers: { 'x-access-token': 'wrong' } })
    assert.equal(listed.status, 401)
    assert.equal(await sbx.files.exists(marker), false, 'a refused request ran its code')
    // The SDK's own calls still work.
    assert.equal((await sbx.runCode('6 * 7')).text, '42')
    assert.ok((await sbx.listCodeContexts()).length > 0)
  })
})

test('code interpreter with allowPublicTraffic false', async (t) => {
  const sbx = await Sandbox.create({ network: { allowPublicTraffic: false }, timeoutMs: 300_000 })
  t.after(() => sbx.kill().catch(() => {}))
  assert.ok(sbx.trafficAccessToken)
  // The SDK sends both tokens with runCode, the traffic token with the rest.
  assert.equal((await sbx.runCode('6 * 7')).text, '42')
  const ctx = await sbx.createCodeContext({ language: 'bash' })
  assert.ok((await sbx.listCodeContexts()).some((c) => c.id === ctx.id))
  await sbx.removeCodeContext(ctx)
  // The envd token alone does not pass the proxy.
  const res = await fetch(`${process.env.E2B_SANDBOX_URL}/execute`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49999', 'X-Access-Token': sbx.envdAccessToken },
    body: JSON.stringify({ code: '1' }),
  })
  assert.equal(res.status, 403)
})
