// Networking: sandboxes cannot reach each other, the egress policy of
// allow_internet_access and allowOut/denyOut is enforced in the kernel, and
// PUT /network changes it live.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError } from 'e2b'
import { Sandbox, withSandbox } from './helpers.mjs'

// connect tries a TCP connection from inside a sandbox; exit 0 = connected.
const connect = (ip, port) =>
  `python3 -c "import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(0 if s.connect_ex(('${ip}', ${port})) == 0 else 1)"`

async function reaches(sbx, ip, port) {
  try {
    await sbx.commands.run(connect(ip, port))
    return true
  } catch (err) {
    if (err instanceof CommandExitError) return false
    throw err
  }
}

async function addressOf(sbx) {
  const r = await sbx.commands.run("python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])\"")
  return r.stdout.trim()
}

test('sandboxes cannot reach each other; policy is enforced and changes live', async (t) => {
  await withSandbox(t, {}, async (a) => {
    await withSandbox(t, {}, async (b) => {
      const ipA = await addressOf(a)
      const ipB = await addressOf(b)
      assert.match(ipB, /^\d+\.\d+\.\d+\.\d+$/)
      // Each sandbox reaches its own envd; neither reaches the other's.
      assert.equal(await reaches(b, '127.0.0.1', 49983), true, 'a sandbox reaches itself')
      assert.equal(await reaches(a, ipB, 49983), false, 'a reached b')
      assert.equal(await reaches(b, ipA, 49983), false, 'b reached a')

      // No policy opens another sandbox.
      await a.updateNetwork({ allowOut: [`${ipB}/32`, '0.0.0.0/0'] })
      assert.equal(await reaches(a, ipB, 49983), false, 'allowOut opened another sandbox')
      await a.updateNetwork({ denyOut: ['0.0.0.0/0'], allowInternetAccess: false })
      const info = await a.getInfo()
      assert.equal(info.allowInternetAccess, false)
      // The sandbox still serves its own traffic through the proxy.
      assert.equal((await a.commands.run('echo still serving')).stdout, 'still serving\n')
    })
  })
})

test('allow_internet_access=false still serves, and bad rules are refused', async (t) => {
  await withSandbox(t, { allowInternetAccess: false }, async (sbx) => {
    assert.equal((await sbx.commands.run('echo up')).stdout, 'up\n')
    await assert.rejects(sbx.updateNetwork({ denyOut: ['not-a-cidr'] }), /invalid|400/i)
    await assert.rejects(sbx.updateNetwork({ allowOut: ['example.com'] }), /domain/i)
  })
  await assert.rejects(Sandbox.create('base', { network: { allowOut: ['300.1.2.3'] }, timeoutMs: 10_000 }), /invalid|network/i)
})
