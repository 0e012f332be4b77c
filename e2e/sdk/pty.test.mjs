// pty.*: create, input, resize, kill.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { withSandbox, waitFor } from './helpers.mjs'

test('pty', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    let out = ''
    const dec = new TextDecoder()
    const pty = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += dec.decode(d) } })
    assert.ok(pty.pid > 0)
    const enc = new TextEncoder()
    await sbx.pty.sendInput(pty.pid, enc.encode('echo "pty says $((6*7))"; tty\n'))
    await waitFor(() => out.includes('pty says 42'), { what: 'pty echo' })
    await waitFor(() => /\/dev\/pts\/\d+/.test(out), { what: 'tty output' })

    await sbx.pty.sendInput(pty.pid, enc.encode('stty size\n'))
    await waitFor(() => out.includes('24 80'), { what: 'initial size' })
    await sbx.pty.resize(pty.pid, { cols: 120, rows: 40 })
    await sbx.pty.sendInput(pty.pid, enc.encode('stty size\n'))
    await waitFor(() => out.includes('40 120'), { what: 'resized' })

    assert.equal(await sbx.pty.kill(pty.pid), true)
    const r = await pty.wait().catch((e) => e)
    assert.ok(r.exitCode !== 0 || r.error, 'killed pty did not end cleanly')
  })
})
