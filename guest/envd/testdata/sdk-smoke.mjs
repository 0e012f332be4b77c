// Real-SDK smoke test for cubicle's envd: drives a running envd with the official
// `e2b` npm SDK in debug mode (the SDK then talks to http://localhost:49983 directly,
// skipping the control-plane API) and checks commands, PTY, files and watches.
//
// Run it with sdk-smoke.sh, which installs the SDK in a temp dir, starts envd and
// sets the environment this script reads:
//   E2B_SDK_DIR  directory holding node_modules/e2b
//   SMOKE_DIR    scratch directory envd may write in (becomes the default workdir)
//   ENVD_URL     base URL of envd (http://localhost:49983)
import { strict as assert } from 'node:assert'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { gzipSync } from 'node:zlib'

const sdkDir = process.env.E2B_SDK_DIR
const dir = process.env.SMOKE_DIR
const envdUrl = process.env.ENVD_URL ?? 'http://localhost:49983'
if (!sdkDir || !dir) throw new Error('E2B_SDK_DIR and SMOKE_DIR must be set (use sdk-smoke.sh)')

const e2b = await import(pathToFileURL(path.join(sdkDir, 'node_modules/e2b/dist/index.mjs')).href)
const { Sandbox, CommandExitError, FileNotFoundError, FilesystemEventType, NotFoundError } = e2b

const results = []
async function check(name, fn) {
  const t0 = Date.now()
  try {
    await fn()
    results.push({ name, ok: true, ms: Date.now() - t0 })
  } catch (err) {
    results.push({ name, ok: false, ms: Date.now() - t0, err })
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function until(what, cond, ms = 5000) {
  const end = Date.now() + ms
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(25)
  }
}

// Phase 1: envd fresh, no access token yet, reached the way E2B_DEBUG users do.
{
  const sbx = await Sandbox.connect('debug_sandbox_id', { debug: true })
  await check('no token: isRunning (GET /health)', async () => assert.equal(await sbx.isRunning(), true))
  await check('no token: commands.run', async () => {
    const r = await sbx.commands.run('echo hello')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'hello\n')
  })
}

// The host's POST /init: token, env, workdir.
const token = 'smoke-token-' + Math.random().toString(16).slice(2)
{
  const res = await fetch(`${envdUrl}/init`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({
      accessToken: token,
      envVars: { E2B_SANDBOX_ID: 'smokesandbox0000001', E2B_TEMPLATE_ID: 'base', SMOKE_GLOBAL: 'global' },
      defaultWorkdir: dir,
      timestamp: new Date().toISOString(),
    }),
  })
  assert.equal(res.status, 204, `POST /init: ${res.status} ${await res.text()}`)
  assert.equal(res.headers.get('x-envd-version'), '0.6.13')
}

// Phase 2: a secured sandbox, as the SDK builds one from the API's answer.
const sbx = new Sandbox({ sandboxId: 'smokesandbox0000001', envdVersion: '0.6.13', envdAccessToken: token, debug: true })
const anon = await Sandbox.connect('smokesandbox0000001', { debug: true }) // no token

await check('auth: request without token is refused', async () => {
  await assert.rejects(anon.commands.run('true'), (e) => e.name === 'AuthenticationError')
  await assert.rejects(anon.files.read('x'), (e) => e.name === 'AuthenticationError')
})

await check('commands.run: stdout, env from /init, default env, workdir', async () => {
  const r = await sbx.commands.run('echo "$SMOKE_GLOBAL $E2B_SANDBOX $E2B_SANDBOX_ID"; pwd')
  assert.equal(r.stdout, `global true smokesandbox0000001\n${dir}\n`)
})
await check('commands.run: envs, cwd, user', async () => {
  const r = await sbx.commands.run('echo $FOO; pwd; whoami', { envs: { FOO: 'bar' }, cwd: '/tmp', user: 'root' })
  assert.equal(r.stdout, 'bar\n/tmp\nroot\n')
})
await check('commands.run: non-root user (nobody)', async () => {
  const r = await sbx.commands.run('id -u', { user: 'nobody' })
  assert.equal(r.stdout.trim(), '65534')
})
await check('commands.run: unknown user → AuthenticationError', async () => {
  await assert.rejects(sbx.commands.run('true', { user: 'no-such-user' }), (e) => e.name === 'AuthenticationError')
})
await check('commands.run: bad cwd → InvalidArgumentError', async () => {
  await assert.rejects(sbx.commands.run('true', { cwd: '/no/such/dir' }), (e) => e.name === 'InvalidArgumentError')
})
await check('commands.run: exit code and stderr → CommandExitError', async () => {
  await assert.rejects(sbx.commands.run('echo oops >&2; exit 3'), (e) => {
    assert.ok(e instanceof CommandExitError)
    assert.equal(e.exitCode, 3)
    assert.equal(e.stderr, 'oops\n')
    assert.equal(e.error, 'exit status 3')
    return true
  })
})
await check('commands.run: callbacks see streamed output', async () => {
  const out = []
  await sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.05; done', { onStdout: (d) => out.push(d) })
  assert.equal(out.join(''), '1\n2\n3\n')
})
await check('commands.run: large output arrives complete', async () => {
  const r = await sbx.commands.run('head -c 3000000 /dev/zero | tr "\\0" a')
  assert.equal(r.stdout.length, 3000000)
})
await check('commands.run: timeoutMs kills the command', async () => {
  const t0 = Date.now()
  await assert.rejects(sbx.commands.run('sleep 10', { timeoutMs: 1000 }))
  assert.ok(Date.now() - t0 < 5000)
  await until('killed sleep to disappear', async () => !(await sbx.commands.list()).some((p) => p.args.includes('sleep 10')))
})
await check('commands: background, list, connect, kill', async () => {
  const h = await sbx.commands.run('echo started; sleep 30', { background: true })
  await until('first output', async () => h.stdout === 'started\n')
  const listed = (await sbx.commands.list()).find((p) => p.pid === h.pid)
  assert.ok(listed, 'process listed')
  assert.deepEqual(listed.args, ['-l', '-c', 'echo started; sleep 30'])
  const other = await sbx.commands.connect(h.pid)
  assert.equal(other.pid, h.pid)
  assert.equal(await sbx.commands.kill(h.pid), true)
  await assert.rejects(h.wait(), (e) => e instanceof CommandExitError && e.error === 'signal: killed')
  await assert.rejects(other.wait(), (e) => e instanceof CommandExitError)
  assert.equal(await sbx.commands.kill(h.pid), false)
})
await check('commands: connect to unknown pid → NotFoundError', async () => {
  await assert.rejects(sbx.commands.connect(999999), (e) => e instanceof NotFoundError)
})
await check('commands: stdin (sendStdin + closeStdin)', async () => {
  const h = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(h.pid, 'Hello,\nWorld!')
  await until('echoed stdin', async () => h.stdout === 'Hello,\nWorld!')
  await h.closeStdin()
  const r = await h.wait()
  assert.equal(r.exitCode, 0)
})
await check('commands: stdin disabled by default reads EOF', async () => {
  const r = await sbx.commands.run('cat; echo done')
  assert.equal(r.stdout, 'done\n')
})

await check('pty: create, input, resize, exit', async () => {
  let out = ''
  const dec = new TextDecoder()
  const h = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += dec.decode(d) }, envs: { PS1: '$ ' } })
  await sbx.pty.sendInput(h.pid, new TextEncoder().encode('echo pty-$((40+2)); stty size\n'))
  await until('pty output', async () => out.includes('pty-42') && out.includes('24 80'))
  await sbx.pty.resize(h.pid, { cols: 100, rows: 30 })
  await sbx.pty.sendInput(h.pid, new TextEncoder().encode('stty size; exit 5\n'))
  const r = await h.wait().catch((e) => e)
  assert.ok(out.includes('30 100'), `resized size in output: ${JSON.stringify(out)}`)
  assert.equal(r.exitCode, 5)
})
await check('pty: kill', async () => {
  const h = await sbx.pty.create({ cols: 80, rows: 24, onData: () => {} })
  assert.equal(await sbx.pty.kill(h.pid), true)
  await assert.rejects(h.wait())
})

await check('files: write/read text, bytes, blob, stream', async () => {
  const info = await sbx.files.write('a/b/hello.txt', 'Hello, files!')
  assert.equal(info.path, `${dir}/a/b/hello.txt`)
  assert.equal(info.name, 'hello.txt')
  assert.equal(await sbx.files.read('a/b/hello.txt'), 'Hello, files!')
  assert.deepEqual(Buffer.from(await sbx.files.read('a/b/hello.txt', { format: 'bytes' })).toString(), 'Hello, files!')
  assert.equal(await (await sbx.files.read('a/b/hello.txt', { format: 'blob' })).text(), 'Hello, files!')
  const stream = await sbx.files.read('a/b/hello.txt', { format: 'stream' })
  let s = ''
  for await (const chunk of stream) s += Buffer.from(chunk).toString()
  assert.equal(s, 'Hello, files!')
})
await check('files: empty file', async () => {
  await sbx.files.write('empty.txt', '')
  assert.equal(await sbx.files.read('empty.txt'), '')
})
await check('files: gzip upload and download', async () => {
  const big = 'x'.repeat(1 << 20)
  await sbx.files.write('gz.txt', big, { gzip: true })
  assert.equal(await sbx.files.read('gz.txt', { gzip: true }), big)
})
await check('files: octet-stream upload of a stream', async () => {
  const body = new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode('streamed')); c.close() } })
  await sbx.files.write('streamed.txt', body)
  assert.equal(await sbx.files.read('streamed.txt'), 'streamed')
})
await check('files: writeFiles (multipart, several parts) with metadata', async () => {
  const infos = await sbx.files.writeFiles([
    { path: 'multi/one.txt', data: 'one' },
    { path: `${dir}/multi/two.txt`, data: new Blob(['two']) },
  ], { metadata: { source: 'smoke' } })
  assert.equal(infos.length, 2)
  assert.deepEqual(infos.map((i) => i.path), [`${dir}/multi/one.txt`, `${dir}/multi/two.txt`])
  assert.deepEqual(infos[0].metadata, { source: 'smoke' })
  assert.equal(await sbx.files.read('multi/two.txt'), 'two')
  assert.deepEqual((await sbx.files.getInfo('multi/one.txt')).metadata, { source: 'smoke' })
})
await check('files: metadata replaced on overwrite, octet-stream metadata', async () => {
  const a = await sbx.files.write('meta.txt', 'x', { metadata: { author: 'mish', purpose: 'upload' }, useOctetStream: true })
  assert.deepEqual(a.metadata, { author: 'mish', purpose: 'upload' })
  const b = await sbx.files.write('meta.txt', 'y')
  assert.equal(b.metadata, undefined)
  assert.equal((await sbx.files.getInfo('meta.txt')).metadata, undefined)
})
await check('files: read missing → FileNotFoundError', async () => {
  await assert.rejects(sbx.files.read('does-not-exist.txt'), (e) => e instanceof FileNotFoundError)
})
await check('files: read a directory → InvalidArgumentError', async () => {
  await assert.rejects(sbx.files.read('a'), (e) => e.name === 'InvalidArgumentError')
})
await check('files: exists, getInfo, list with depth', async () => {
  assert.equal(await sbx.files.exists('a/b/hello.txt'), true)
  assert.equal(await sbx.files.exists('nope'), false)
  const info = await sbx.files.getInfo('a/b/hello.txt')
  assert.equal(info.type, 'file')
  assert.equal(info.size, 13)
  assert.equal(info.permissions, '-rw-r--r--')
  assert.equal(info.owner, 'root')
  assert.ok(info.modifiedTime instanceof Date && Math.abs(info.modifiedTime - Date.now()) < 60000)
  assert.equal((await sbx.files.getInfo('a')).type, 'dir')
  assert.deepEqual((await sbx.files.list('a')).map((e) => e.name), ['b'])
  assert.deepEqual((await sbx.files.list('a', { depth: 2 })).map((e) => e.path), [`${dir}/a/b`, `${dir}/a/b/hello.txt`])
})
await check('files: symlink', async () => {
  await sbx.commands.run(`ln -sfn ${dir}/a link-to-a`)
  const info = await sbx.files.getInfo('link-to-a')
  assert.equal(info.type, 'dir')
  assert.equal(info.symlinkTarget, `${dir}/a`)
})
await check('files: makeDir, rename, remove', async () => {
  assert.equal(await sbx.files.makeDir('newdir/sub'), true)
  assert.equal(await sbx.files.makeDir('newdir/sub'), false)
  await sbx.files.write('newdir/sub/f.txt', 'f', { metadata: { stage: 'renamed' } })
  const moved = await sbx.files.rename('newdir/sub/f.txt', 'moved/g.txt')
  assert.equal(moved.path, `${dir}/moved/g.txt`)
  assert.deepEqual(moved.metadata, { stage: 'renamed' })
  await sbx.files.remove('newdir')
  assert.equal(await sbx.files.exists('newdir'), false)
  await sbx.files.remove('never-existed') // not an error, as in E2B
  await assert.rejects(sbx.files.rename('never-existed', 'x'), (e) => e instanceof FileNotFoundError)
})
await check('files: as another user (owner set to nobody)', async () => {
  await sbx.files.write(`${dir}/nobody.txt`, 'n', { user: 'nobody' })
  assert.equal((await sbx.files.getInfo(`${dir}/nobody.txt`)).owner, 'nobody')
})
await check('files: watchDir recursive, including new subdirectories', async () => {
  await sbx.files.makeDir('watched')
  const events = []
  const h = await sbx.files.watchDir('watched', (e) => events.push(e), { recursive: true })
  await sbx.files.makeDir('watched/nested')
  await until('create event for nested dir', async () => events.some((e) => e.type === FilesystemEventType.CREATE && e.name === 'nested'))
  await sbx.files.write('watched/nested/file.txt', 'data')
  await until('write event in nested dir', async () => events.some((e) => e.type === FilesystemEventType.WRITE && e.name === 'nested/file.txt'))
  await sbx.files.rename('watched/nested/file.txt', 'watched/renamed.txt')
  await sbx.files.remove('watched/renamed.txt')
  await until('rename and remove events', async () =>
    events.some((e) => e.type === FilesystemEventType.RENAME && e.name === 'nested/file.txt') &&
    events.some((e) => e.type === FilesystemEventType.REMOVE && e.name === 'renamed.txt'))
  await h.stop()
})
await check('files: watchDir with entries', async () => {
  const events = []
  const h = await sbx.files.watchDir('watched', (e) => events.push(e), { includeEntry: true })
  await sbx.files.write('watched/e.txt', 'entry')
  await until('event with entry', async () => events.some((e) => e.name === 'e.txt' && e.entry?.type === 'file'))
  await h.stop()
})
await check('files: watchDir on missing dir → FileNotFoundError, on file → error', async () => {
  await assert.rejects(sbx.files.watchDir('missing-dir', () => {}), (e) => e instanceof FileNotFoundError)
  await assert.rejects(sbx.files.watchDir('a/b/hello.txt', () => {}), (e) => e.name === 'InvalidArgumentError')
})

await check('signed URLs: download, upload, expired', async () => {
  await sbx.files.write('signed.txt', 'hello world')
  const okUrl = await sbx.downloadUrl('signed.txt', { useSignatureExpiration: 10_000 })
  let res = await fetch(okUrl)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'hello world')
  const expired = await sbx.downloadUrl('signed.txt', { useSignatureExpiration: -10_000 })
  res = await fetch(expired)
  assert.equal(res.status, 401)
  assert.deepEqual(await res.json(), { code: 401, message: 'signature is already expired' })
  const upUrl = await sbx.uploadUrl('signed-up.txt', { user: 'root' })
  const form = new FormData()
  form.append('file', 'file content')
  res = await fetch(upUrl, { method: 'POST', body: form })
  assert.equal(res.status, 200)
  assert.deepEqual(await res.json(), [{ name: 'signed-up.txt', path: `${dir}/signed-up.txt`, type: 'file' }])
  res = await fetch(`${envdUrl}/files?path=signed.txt`)
  assert.equal(res.status, 401)
})
await check('range download', async () => {
  const res = await fetch(`${envdUrl}/files?path=signed.txt`, { headers: { 'X-Access-Token': token, Range: 'bytes=6-' } })
  assert.equal(res.status, 206)
  assert.equal(await res.text(), 'world')
})
await check('raw gzip upload through fetch', async () => {
  const res = await fetch(`${envdUrl}/files?path=rawgz.txt`, {
    method: 'POST',
    headers: { 'X-Access-Token': token, 'Content-Type': 'application/octet-stream', 'Content-Encoding': 'gzip' },
    body: gzipSync(Buffer.from('zipped')),
  })
  assert.equal(res.status, 200)
  assert.equal(await sbx.files.read('rawgz.txt'), 'zipped')
})

let failed = 0
for (const r of results) {
  console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${r.ms} ms)`)
  if (!r.ok) {
    failed++
    console.log('     ', r.err?.stack ?? r.err)
  }
}
console.log(`${results.length - failed}/${results.length} passed`)
process.exit(failed ? 1 : 0)
