// files.*: write/read text and binary, 50 MB up and down, list, getInfo,
// exists, makeDir, rename, remove, watchDir.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { FilesystemEventType } from 'e2b'
import { withSandbox, waitFor } from './helpers.mjs'

test('files', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await t.test('text round trip, relative to the home dir, owned by user', async () => {
      await sbx.files.write('notes/hello.txt', 'héllo wörld\n')
      assert.equal(await sbx.files.read('/home/user/notes/hello.txt'), 'héllo wörld\n')
      const info = await sbx.files.getInfo('notes/hello.txt')
      assert.equal(info.name, 'hello.txt')
      assert.equal(info.type, 'file')
      assert.equal(info.path, '/home/user/notes/hello.txt')
      assert.equal(info.size, Buffer.byteLength('héllo wörld\n'))
      assert.equal(info.owner, 'user')
    })
    await t.test('binary round trip', async () => {
      const data = randomBytes(4096)
      await sbx.files.write('/tmp/bin.dat', data.buffer.slice(data.byteOffset, data.byteOffset + data.length))
      const back = Buffer.from(await sbx.files.read('/tmp/bin.dat', { format: 'bytes' }))
      assert.ok(back.equals(data))
    })
    await t.test('50 MB upload and download', async () => {
      const data = randomBytes(50 * 1024 * 1024)
      const sum = createHash('sha256').update(data).digest('hex')
      await sbx.files.write('/tmp/big.bin', new Blob([data]))
      const inside = await sbx.commands.run('sha256sum /tmp/big.bin | cut -d" " -f1')
      assert.equal(inside.stdout.trim(), sum)
      const back = Buffer.from(await sbx.files.read('/tmp/big.bin', { format: 'bytes' }))
      assert.equal(back.length, data.length)
      assert.equal(createHash('sha256').update(back).digest('hex'), sum)
      await sbx.files.remove('/tmp/big.bin')
    })
    await t.test('makeDir, list, exists, rename, remove', async () => {
      assert.equal(await sbx.files.makeDir('/tmp/d/sub'), true)
      assert.equal(await sbx.files.makeDir('/tmp/d/sub'), false, 'existing dir')
      await sbx.files.write('/tmp/d/a.txt', 'a')
      const names = (await sbx.files.list('/tmp/d')).map((e) => `${e.name}:${e.type}`).sort()
      assert.deepEqual(names, ['a.txt:file', 'sub:dir'])
      assert.equal(await sbx.files.exists('/tmp/d/a.txt'), true)
      const moved = await sbx.files.rename('/tmp/d/a.txt', '/tmp/d/sub/b.txt')
      assert.equal(moved.path, '/tmp/d/sub/b.txt')
      assert.equal(await sbx.files.exists('/tmp/d/a.txt'), false)
      assert.equal(await sbx.files.read('/tmp/d/sub/b.txt'), 'a')
      await sbx.files.remove('/tmp/d')
      assert.equal(await sbx.files.exists('/tmp/d'), false)
      await assert.rejects(sbx.files.read('/tmp/d/sub/b.txt'), /not (exist|found)/i)
    })
    await t.test('watchDir sees create, write and remove, recursively', async () => {
      await sbx.files.makeDir('/tmp/w/deep')
      const events = []
      const handle = await sbx.files.watchDir('/tmp/w', (e) => events.push(e), { recursive: true })
      await sbx.files.write('/tmp/w/deep/f.txt', 'x')
      await sbx.commands.run('echo more >> /tmp/w/deep/f.txt; rm /tmp/w/deep/f.txt')
      await waitFor(() => events.some((e) => e.type === FilesystemEventType.REMOVE), { what: 'remove event' })
      await handle.stop()
      const kinds = new Set(events.filter((e) => e.name.endsWith('f.txt')).map((e) => e.type))
      assert.ok(kinds.has(FilesystemEventType.CREATE), `events: ${JSON.stringify(events)}`)
      assert.ok(kinds.has(FilesystemEventType.WRITE), `events: ${JSON.stringify(events)}`)
      await assert.rejects(sbx.files.watchDir('/tmp/nope', () => {}), /not found|does not exist/i)
    })
  })
})
