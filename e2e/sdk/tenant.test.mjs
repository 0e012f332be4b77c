// Tenant walls: a second API key sees none of the first key's sandboxes.
// The Go test TestTenantWallsSDK makes the second key and passes it in
// CUBICLE_E2E_OTHER_API_KEY.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { NotFoundError, SandboxNotFoundError } from 'e2b'
import { Sandbox, withSandbox } from './helpers.mjs'

const other = process.env.CUBICLE_E2E_OTHER_API_KEY

async function listIds(apiKey) {
  const ids = []
  const pager = Sandbox.list({ apiKey })
  while (pager.hasNext) {
    for (const s of await pager.nextItems()) ids.push(s.sandboxId)
  }
  return ids
}

test('another key cannot connect to, inspect, kill or list a sandbox', async (t) => {
  assert.ok(other, 'CUBICLE_E2E_OTHER_API_KEY is not set')
  await withSandbox(t, {}, async (sbx) => {
    const id = sbx.sandboxId
    await assert.rejects(Sandbox.connect(id, { apiKey: other }), (err) => err instanceof SandboxNotFoundError)
    await assert.rejects(Sandbox.getInfo(id, { apiKey: other }), (err) => err instanceof NotFoundError)
    await assert.rejects(Sandbox.setTimeout(id, 1_000, { apiKey: other }), (err) => err instanceof NotFoundError)
    // The SDK's kill reports a sandbox it could not find as false.
    assert.equal(await Sandbox.kill(id, { apiKey: other }), false)
    assert.ok(!(await listIds(other)).includes(id), 'the other key lists the sandbox')

    // The other key's own sandbox is listed to it, and not to the owner.
    const mine = await Sandbox.create('base', { apiKey: other, timeoutMs: 60_000 })
    t.after(() => mine.kill().catch(() => {}))
    const otherIds = await listIds(other)
    assert.ok(otherIds.includes(mine.sandboxId) && !otherIds.includes(id), JSON.stringify(otherIds))
    assert.ok(!(await listIds()).includes(mine.sandboxId), 'the owner lists the other key\'s sandbox')

    // Nothing happened to the sandbox: its owner still uses it.
    assert.equal(await sbx.isRunning(), true)
    const r = await sbx.commands.run('echo still mine')
    assert.equal(r.stdout.trim(), 'still mine')
    assert.equal((await Sandbox.getInfo(id)).sandboxId, id)
  })
})
