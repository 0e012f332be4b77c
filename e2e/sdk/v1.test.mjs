// The older SDK (2.45) uses the v1 endpoints: POST /sandboxes and
// POST /sandboxes/{id}/connect.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b-v1'

test('e2b 2.45: create, run, files, connect, list, kill', async (t) => {
  const sbx = await Sandbox.create('base', { metadata: { sdk: 'v1' }, envs: { V: 'one' }, timeoutMs: 60_000 })
  t.after(() => sbx.kill().catch(() => {}))
  const r = await sbx.commands.run('echo $V')
  assert.equal(r.stdout, 'one\n')
  await sbx.files.write('/tmp/v1.txt', 'v1 file')
  const again = await Sandbox.connect(sbx.sandboxId)
  assert.equal(await again.files.read('/tmp/v1.txt'), 'v1 file')
  const listed = await Sandbox.list({ query: { metadata: { sdk: 'v1' } } }).nextItems()
  assert.ok(listed.some((s) => s.sandboxId === sbx.sandboxId))
  // A signed URL carries no sandbox headers: the proxy finds the sandbox
  // whose token made the signature.
  const url = await sbx.downloadUrl('/tmp/v1.txt')
  const res = await fetch(url)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'v1 file')
  const forged = new URL(url)
  forged.searchParams.set('signature', 'v1_forged')
  assert.equal((await fetch(forged)).status, 400)
  assert.equal(await sbx.kill(), true)
  assert.equal(await sbx.isRunning(), false)
})
