// Volumes with the SDK's Volume class: create, list, getInfo; a sandbox
// with volumeMounts writes, a second reads (mounted by name), the content
// API (E2B_VOLUME_API_URL) reads and writes the same files, the files
// outlive both sandboxes; a mounted volume cannot be deleted; another
// owner sees none of it.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, Volume, VolumeNotFoundError, VolumePathNotFoundError } from 'e2b'

const other = process.env.CUBICLE_E2E_OTHER_API_KEY

async function sandbox(t, opts) {
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000, ...opts })
  t.after(() => sbx.kill().catch(() => {}))
  return sbx
}

test('volumes', async (t) => {
  const name = `e2e-vol-${Date.now()}`
  const vol = await Volume.create(name)
  t.after(() => Volume.destroy(vol.volumeId).catch(() => {}))
  assert.equal(vol.name, name)
  assert.ok(vol.volumeId && vol.token)

  await t.test('list, getInfo, duplicate name', async () => {
    assert.ok((await Volume.list()).some((v) => v.volumeId === vol.volumeId && v.name === name))
    const info = await Volume.getInfo(vol.volumeId)
    assert.equal(info.name, name)
    assert.equal(info.token, vol.token)
    await assert.rejects(Volume.create(name), /already exists/)
    await assert.rejects(Volume.create('bad name!'), /volume name/)
  })

  await t.test('another owner sees nothing', { skip: !other && 'CUBICLE_E2E_OTHER_API_KEY not set' }, async () => {
    assert.ok(!(await Volume.list({ apiKey: other })).some((v) => v.volumeId === vol.volumeId))
    await assert.rejects(Volume.getInfo(vol.volumeId, { apiKey: other }), VolumeNotFoundError)
    assert.equal(await Volume.destroy(vol.volumeId, { apiKey: other }), false)
    await assert.rejects(Sandbox.create('base', { apiKey: other, volumeMounts: { '/data': name } }), /no volume named/)
  })

  const a = await sandbox(t, { volumeMounts: { '/mnt/data': vol } })
  const b = await sandbox(t, { volumeMounts: { '/home/user/shared': name } })

  await t.test('one sandbox writes, another reads', async () => {
    const w = await a.commands.run('mkdir -p /mnt/data/dir && echo from-a > /mnt/data/dir/hello.txt && echo ok')
    assert.equal(w.stdout.trim(), 'ok')
    assert.equal((await b.files.read('/home/user/shared/dir/hello.txt')).trim(), 'from-a')
    await b.files.write('/home/user/shared/from-b.txt', 'from-b')
    assert.equal((await a.commands.run('cat /mnt/data/from-b.txt')).stdout, 'from-b')
    const info = await a.getInfo()
    assert.deepEqual(info.volumeMounts, [{ name, path: '/mnt/data' }])
  })

  await t.test('the content API sees the same files', async () => {
    assert.equal((await vol.readFile('/dir/hello.txt')).trim(), 'from-a')
    const st = await vol.writeFile('/api/written.txt', 'via the content API', { force: true })
    assert.equal(st.type, 'file')
    assert.equal(st.path, '/api/written.txt')
    assert.equal(st.size, 'via the content API'.length)
    assert.ok(st.mtime instanceof Date && !Number.isNaN(st.mtime.getTime()))
    assert.equal((await b.commands.run('cat /home/user/shared/api/written.txt')).stdout, 'via the content API')
    const dir = await vol.makeDir('/made/deep', { force: true })
    assert.equal(dir.type, 'directory')
    const names = (await vol.list('/')).map((e) => `${e.name}:${e.type}`).sort()
    assert.deepEqual(names, ['api:directory', 'dir:directory', 'from-b.txt:file', 'made:directory'])
    const deep = (await vol.list('/', { depth: 3 })).map((e) => e.path)
    assert.ok(deep.includes('/made/deep') && deep.includes('/dir/hello.txt'))
    const meta = await vol.updateMetadata('/api/written.txt', { mode: 0o600 })
    assert.equal(meta.mode, 0o600)
    assert.equal((await vol.getInfo('/from-b.txt')).size, 'from-b'.length)
    assert.equal(await vol.exists('/nope'), false)
    await assert.rejects(vol.readFile('/nope'), VolumePathNotFoundError)
    const bytes = await vol.readFile('/from-b.txt', { format: 'bytes' })
    assert.equal(Buffer.from(bytes).toString(), 'from-b')
    await vol.remove('/made')
    assert.equal(await vol.exists('/made'), false)
    assert.equal((await a.commands.run('test -e /mnt/data/made || echo gone')).stdout.trim(), 'gone')
    // A symlink a sandbox makes out of the volume leads nowhere on the host.
    await a.commands.run('ln -s /etc/hostname /mnt/data/escape')
    await assert.rejects(vol.readFile('/escape'), VolumePathNotFoundError)
  })

  await t.test('bad mounts are refused', async () => {
    await assert.rejects(Sandbox.create('base', { volumeMounts: { '/proc/x': name } }), /reserved/)
    await assert.rejects(Sandbox.create('base', { volumeMounts: { '/data': 'no-such-volume' } }), /no volume named/)
  })

  await t.test('a mounted volume cannot be deleted; the files outlive the sandboxes', async () => {
    await assert.rejects(Volume.destroy(vol.volumeId), /mounted by sandbox/)
    await a.kill()
    await b.kill()
    const c = await sandbox(t, { volumeMounts: { '/data': vol } })
    assert.equal((await c.files.read('/data/dir/hello.txt')).trim(), 'from-a')
    await c.kill()
    assert.equal(await Volume.destroy(vol.volumeId), true)
    assert.equal(await Volume.destroy(vol.volumeId), false)
    await assert.rejects(Volume.getInfo(vol.volumeId), VolumeNotFoundError)
  })
})
