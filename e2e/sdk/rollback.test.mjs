// Rollback and per-command checkpoints (cubicle extensions; E2B has
// neither) through the real SDK: the rollback itself is a raw call to
// POST /sandboxes/{id}/rollback, and the SDK's Sandbox object goes on
// working on the rolled-back sandbox, which keeps its ID.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, withSandbox } from './helpers.mjs'

const api = process.env.E2B_API_URL
const key = process.env.E2B_API_KEY

async function raw(method, path, body) {
  const res = await fetch(api + path, { method, body, headers: { 'X-API-KEY': key, 'Content-Type': 'application/json' } })
  const text = await res.text()
  let json
  try { json = JSON.parse(text) } catch { json = undefined }
  return { status: res.status, json, text }
}

function rollback(sbx, snapshotID) {
  return raw('POST', `/sandboxes/${sbx.sandboxId}/rollback`, JSON.stringify({ snapshotID }))
}

async function snapshotsOf(sbx) {
  const out = []
  for (const p = Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }); p.hasNext;) out.push(...await p.nextItems())
  return out
}

test('rollback undoes an rm -rf in place', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await sbx.commands.run('mkdir -p ~/project/src && echo hello > ~/project/src/main.txt')
    const snap = await Sandbox.createSnapshot(sbx.sandboxId)
    await sbx.commands.run('rm -rf ~/project')
    assert.equal(await sbx.files.exists('/home/user/project'), false)

    const r = await rollback(sbx, snap.snapshotId)
    assert.equal(r.status, 200, r.text)
    assert.equal(r.json.sandboxID, sbx.sandboxId)

    // The same Sandbox object, the same sandbox, its files back.
    assert.equal(await sbx.files.read('/home/user/project/src/main.txt'), 'hello\n')
    assert.equal((await sbx.commands.run('echo $E2B_SANDBOX_ID')).stdout.trim(), sbx.sandboxId)
    assert.equal(await sbx.isRunning(), true)
    const info = await Sandbox.getInfo(sbx.sandboxId)
    assert.equal(info.state, 'running')
  })
})

test('rollback refuses bad input in E2B\'s error shape', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    const other = await Sandbox.create('base', { timeoutMs: 60_000 })
    t.after(() => other.kill().catch(() => {}))
    const theirs = await Sandbox.createSnapshot(other.sandboxId)
    const path = `/sandboxes/${sbx.sandboxId}/rollback`
    const cases = [
      ['no body', path, undefined, 400],
      ['no snapshotID', path, '{}', 400],
      ['an empty snapshotID', path, '{"snapshotID":""}', 400],
      ['malformed JSON', path, '{"snapshotID":', 400],
      ['an unknown snapshot', path, '{"snapshotID":"aaaaaaaaaaaaaaaaaaaa:default"}', 404],
      ['another sandbox\'s snapshot', path, JSON.stringify({ snapshotID: theirs.snapshotId }), 404],
      ['an unknown sandbox', '/sandboxes/aaaaaaaaaaaaaaaaaaaa/rollback', JSON.stringify({ snapshotID: theirs.snapshotId }), 404],
    ]
    for (const [what, p, body, want] of cases) {
      const r = await raw('POST', p, body)
      assert.equal(r.status, want, `${what}: ${r.text}`)
      assert.equal(r.json?.code, want, `${what}: error shape ${r.text}`)
      assert.equal(typeof r.json?.message, 'string', `${what}: ${r.text}`)
    }
    // Nothing happened to either sandbox.
    assert.equal((await sbx.commands.run('echo ok')).stdout, 'ok\n')
    assert.equal((await other.commands.run('echo ok')).stdout, 'ok\n')
    await Sandbox.deleteSnapshot(theirs.snapshotId)
  })
})

test('per-command checkpoints: a command undone', async (t) => {
  await withSandbox(t, { metadata: { 'cubicle.checkpoint': 'per-command' } }, async (sbx) => {
    await sbx.commands.run('echo one > ~/log')
    await sbx.commands.run('echo two >> ~/log')
    await sbx.commands.run('rm ~/log')
    const names = (await snapshotsOf(sbx)).flatMap((s) => s.names).sort()
    const id = sbx.sandboxId
    assert.deepEqual(names, [1, 2, 3].map((n) => `cmd-${n}.${id}:default`))

    // Undo the 2nd command and the 3rd: back to before the 2nd.
    const r = await rollback(sbx, `cmd-2.${id}:default`)
    assert.equal(r.status, 200, r.text)
    assert.equal(r.json.sandboxID, id)
    assert.equal(await sbx.files.read('/home/user/log'), 'one\n')
    // Commands go on, checkpointed as before.
    assert.equal((await sbx.commands.run('cat ~/log')).stdout, 'one\n')
    assert.ok((await snapshotsOf(sbx)).some((s) => s.names.includes(`cmd-4.${id}:default`)))

    // They end with the sandbox.
    await sbx.kill()
    assert.deepEqual(await snapshotsOf(sbx), [])
  })
})

test('an unknown cubicle.checkpoint is refused at create', async () => {
  await assert.rejects(Sandbox.create('base', { timeoutMs: 10_000, metadata: { 'cubicle.checkpoint': 'always' } }), /cubicle\.checkpoint/)
})
