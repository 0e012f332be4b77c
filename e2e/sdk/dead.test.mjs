// Sandboxes that die under their user: the SDK gets errors within seconds,
// not hangs; the API forgets them (NotFound); the proxy answers its 502.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { NotFoundError } from 'e2b'
import { Sandbox, withSandbox, waitFor } from './helpers.mjs'

const bound = 15_000 // generous: the watch sees a death at once

async function timed(p) {
  const t0 = Date.now()
  try {
    await p
    return { ok: true, ms: Date.now() - t0 }
  } catch (err) {
    return { ok: false, err, ms: Date.now() - t0 }
  }
}

test('a sandbox whose PID 1 is killed fails fast and is gone', async (t) => {
  const sbx = await Sandbox.create('base', { timeoutMs: 300_000 })
  t.after(() => sbx.kill().catch(() => {}))
  // envd is PID 1: the command's own stream dies with it.
  const kill = await timed(sbx.commands.run('kill -9 1; sleep 5; echo survived', { user: 'root', requestTimeoutMs: 60_000 }))
  assert.equal(kill.ok, false, 'kill -9 1 left envd running')
  assert.ok(kill.ms < bound, `the killing command took ${kill.ms} ms to fail`)

  const next = await timed(sbx.commands.run('echo hi', { requestTimeoutMs: 60_000 }))
  assert.equal(next.ok, false, 'a command ran in a dead sandbox')
  assert.ok(next.ms < bound, `commands.run in the dead sandbox took ${next.ms} ms to fail: ${next.err}`)

  await waitFor(async () => {
    try {
      await Sandbox.getInfo(sbx.sandboxId)
      return false
    } catch (err) {
      return err instanceof NotFoundError
    }
  }, { timeoutMs: bound, what: 'getInfo to answer NotFound' })
  const listed = await Sandbox.list().nextItems()
  assert.ok(!listed.some((s) => s.sandboxId === sbx.sandboxId), 'the dead sandbox is still listed')

  const t0 = Date.now()
  const res = await fetch(process.env.E2B_SANDBOX_URL + '/health', { headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49983' } })
  assert.ok(Date.now() - t0 < bound)
  assert.equal(res.status, 502)
  assert.deepEqual(await res.json(), { sandboxId: sbx.sandboxId, message: 'The sandbox was not found', code: 502 })
})

test('/dev/shm is sized to the sandbox and filling it fails a write, not the sandbox', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    const { memoryMB } = await sbx.getInfo()
    const df = await sbx.commands.run('df -B1 --output=size /dev/shm | tail -1')
    const shm = Number(df.stdout.trim())
    assert.equal(shm, memoryMB * 2 ** 19, `/dev/shm is ${shm} bytes in a sandbox of ${memoryMB} MiB, want half of it`)
    const fill = await sbx.commands.run(`head -c ${shm + (16 << 20)} /dev/zero > /dev/shm/fill`).catch((e) => e)
    assert.equal(fill.exitCode, 1, `filling /dev/shm: ${fill}`)
    assert.match(fill.stderr, /No space left on device/)
    await sbx.commands.run('rm /dev/shm/fill')
    assert.equal(await sbx.isRunning(), true)
  })
})
