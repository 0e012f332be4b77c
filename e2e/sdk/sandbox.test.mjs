// Sandbox lifecycle through the v2 API: create, info, list with filters,
// isolation between sandboxes, kill.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, withSandbox } from './helpers.mjs'

test('create with metadata and envVars, getInfo, kill', async (t) => {
  const tag = `run-${Date.now()}`
  const sbx = await Sandbox.create('base', { metadata: { suite: 'e2e', tag }, envs: { GREETING: 'hello from cubicle' }, timeoutMs: 60_000 })
  t.after(() => sbx.kill().catch(() => {}))
  assert.match(sbx.sandboxId, /^[a-z0-9]{20}$/)

  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.templateId, 'base')
  assert.deepEqual(info.metadata, { suite: 'e2e', tag })
  assert.equal(info.state, 'running')
  assert.ok(info.endAt > info.startedAt)
  assert.ok(info.cpuCount > 0 && info.memoryMB > 0)

  const r = await sbx.commands.run('echo "$GREETING $E2B_SANDBOX_ID $E2B_SANDBOX"')
  assert.equal(r.stdout.trim(), `hello from cubicle ${sbx.sandboxId} true`)

  assert.equal(await sbx.isRunning(), true)
  assert.equal(await sbx.kill(), true)
  assert.equal(await sbx.isRunning(), false)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'a second kill finds nothing')
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), /not found/i)
})

test('list filters by metadata and state, and paginates', async (t) => {
  const tag = `list-${Date.now()}`
  const made = await Promise.all([0, 1, 2].map((i) =>
    Sandbox.create('base', { metadata: { tag, i: String(i) }, timeoutMs: 60_000 })))
  t.after(() => Promise.all(made.map((s) => s.kill().catch(() => {}))))

  const all = []
  const pager = Sandbox.list({ query: { metadata: { tag } }, limit: 2 })
  while (pager.hasNext) all.push(...await pager.nextItems())
  assert.deepEqual(all.map((s) => s.sandboxId).sort(), made.map((s) => s.sandboxId).sort())

  const one = await Sandbox.list({ query: { metadata: { tag, i: '1' } } }).nextItems()
  assert.deepEqual(one.map((s) => s.sandboxId), [made[1].sandboxId])

  await made[2].pause()
  const running = await Sandbox.list({ query: { metadata: { tag }, state: ['running'] } }).nextItems()
  assert.deepEqual(running.map((s) => s.sandboxId).sort(), [made[0].sandboxId, made[1].sandboxId].sort())
  const paused = await Sandbox.list({ query: { metadata: { tag }, state: ['paused'] } }).nextItems()
  assert.deepEqual(paused.map((s) => s.sandboxId), [made[2].sandboxId])
  assert.equal(paused[0].state, 'paused')
})

test('two sandboxes cannot see each other\'s files or processes', async (t) => {
  await withSandbox(t, {}, async (a) => {
    await withSandbox(t, {}, async (b) => {
      await a.files.write('/tmp/secret-a', 'only in a')
      const sleeper = await a.commands.run('sleep 300', { background: true })
      assert.equal(await b.files.exists('/tmp/secret-a'), false)
      const ps = await b.commands.run('ps -eo pid,args')
      assert.doesNotMatch(ps.stdout, /sleep 300/)
      const procs = await b.commands.list()
      assert.ok(!procs.some((p) => p.pid === sleeper.pid && p.cmd === '/bin/bash' && p.args.includes('sleep 300')))
      await sleeper.kill()
    })
  })
})
