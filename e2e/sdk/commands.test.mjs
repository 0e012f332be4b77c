// commands.*: run, background + wait, stdin, kill, envs, cwd, user, exit codes.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError } from 'e2b'
import { withSandbox, waitFor } from './helpers.mjs'

test('commands', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    await t.test('run returns stdout, stderr and exit code 0', async () => {
      const r = await sbx.commands.run('echo out; echo err >&2')
      assert.equal(r.exitCode, 0)
      assert.equal(r.stdout, 'out\n')
      assert.equal(r.stderr, 'err\n')
    })
    await t.test('non-zero exit throws CommandExitError with the output', async () => {
      await assert.rejects(sbx.commands.run('echo partial; exit 3'), (err) => {
        assert.ok(err instanceof CommandExitError)
        assert.equal(err.exitCode, 3)
        assert.equal(err.stdout, 'partial\n')
        return true
      })
    })
    await t.test('envs, cwd and the default user', async () => {
      const r = await sbx.commands.run('echo "$FOO:$(pwd):$(whoami):$HOME"', { envs: { FOO: 'bar' }, cwd: '/tmp' })
      assert.equal(r.stdout.trim(), 'bar:/tmp:user:/home/user')
      const home = await sbx.commands.run('pwd')
      assert.equal(home.stdout.trim(), '/home/user')
    })
    await t.test('user root', async () => {
      const r = await sbx.commands.run('whoami; echo $HOME', { user: 'root' })
      assert.equal(r.stdout, 'root\n/root\n')
    })
    await t.test('user has passwordless sudo', async () => {
      // setuid works inside the sandbox (runsc --allow-suid), as agents
      // expect of E2B's user: sudo apt-get install ...
      const r = await sbx.commands.run('sudo -n id -u')
      assert.equal(r.stdout, '0\n')
    })
    await t.test('unknown cwd is an error', async () => {
      await assert.rejects(sbx.commands.run('true', { cwd: '/does/not/exist' }))
    })
    await t.test('streaming callbacks see output in order', async () => {
      const seen = []
      await sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.1; done', { onStdout: (d) => seen.push(d) })
      assert.equal(seen.join(''), '1\n2\n3\n')
    })
    await t.test('background + wait', async () => {
      const h = await sbx.commands.run('sleep 0.5; echo done', { background: true })
      assert.ok(h.pid > 0)
      const listed = await sbx.commands.list()
      assert.ok(listed.some((p) => p.pid === h.pid))
      const r = await h.wait()
      assert.equal(r.stdout, 'done\n')
    })
    await t.test('stdin', async () => {
      const h = await sbx.commands.run('cat', { background: true, stdin: true })
      await h.sendStdin('hello ')
      await sbx.commands.sendStdin(h.pid, 'stdin\n')
      await h.closeStdin()
      const r = await h.wait()
      assert.equal(r.stdout, 'hello stdin\n')
    })
    await t.test('kill a running command', async () => {
      const h = await sbx.commands.run('sleep 600', { background: true })
      assert.equal(await sbx.commands.kill(h.pid), true)
      await assert.rejects(h.wait(), (err) => err instanceof CommandExitError)
      assert.equal(await sbx.commands.kill(999999), false)
    })
    await t.test('connect to a running command by pid', async () => {
      const h = await sbx.commands.run('sleep 0.5; echo later', { background: true })
      const again = await sbx.commands.connect(h.pid)
      const r = await again.wait()
      assert.equal(r.stdout, 'later\n')
    })
    await t.test('a command that floods stdout does not take the sandbox down', async () => {
      const r = await sbx.commands.run('head -c 50000000 /dev/zero | base64 -w 0 | wc -c', { timeoutMs: 120_000 })
      assert.equal(r.stdout.trim(), String(Math.ceil(50000000 / 3) * 4))
      let got = 0
      const h = await sbx.commands.run('yes flood | head -c 30000000', { background: true, onStdout: (d) => { got += d.length } })
      await h.wait()
      assert.equal(got, 30000000)
      const after = await sbx.commands.run('echo still here')
      assert.equal(after.stdout, 'still here\n')
    })
    await t.test('timeoutMs kills the command', async () => {
      await assert.rejects(sbx.commands.run('sleep 30', { timeoutMs: 1000 }))
      // envd kills it when it sees the stream end, which races the next
      // request on a loaded host: it must be gone soon, not at once.
      // -x: the whole command line, so this shell's own does not match.
      await waitFor(async () => (await sbx.commands.run('pgrep -fx "sleep 30" || echo none')).stdout.trim() === 'none',
        { timeoutMs: 10_000, what: 'the timed-out command to be killed' })
    })
  })
})
