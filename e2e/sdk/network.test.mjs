// Networking: sandboxes cannot reach each other, the egress policy of
// allow_internet_access and allowOut/denyOut is enforced in the kernel, and
// PUT /network changes it live.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError } from 'e2b'
import { Sandbox, withSandbox } from './helpers.mjs'

// connect tries a TCP connection from inside a sandbox to an address or a
// name (resolved by the sandbox's resolver); exit 0 = connected.
const connect = (host, port) =>
  `python3 -c "import socket,sys
try: socket.create_connection(('${host}', ${port}), timeout=2).close()
except OSError: sys.exit(1)"`

// The fake internet of the e2e harness (e2e/inet_test.go).
const inet = {
  port: Number(process.env.E2E_INET_PORT),
  allowed: process.env.E2E_INET_ALLOWED, // allowed.test
  other: process.env.E2E_INET_OTHER, // other.test
  wild: process.env.E2E_INET_WILD, // *.wild.test
}

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
    await assert.rejects(sbx.updateNetwork({ denyOut: ['example.com'] }), /domain|CIDR/i)
    await assert.rejects(sbx.updateNetwork({ allowOut: ['*.com'] }), /invalid|domain/i)
  })
  await assert.rejects(Sandbox.create('base', { network: { allowOut: ['300.1.2.3'] }, timeoutMs: 10_000 }), /invalid|network/i)
})

// resolve returns the IPv4 addresses the sandbox's resolver gives for name
// ([] when it refuses or the name does not exist).
async function resolve(sbx, name) {
  try {
    const r = await sbx.commands.run(`getent ahostsv4 ${name}`)
    return [...new Set(r.stdout.split('\n').filter(Boolean).map((l) => l.split(/\s+/)[0]))]
  } catch (err) {
    if (err instanceof CommandExitError) return []
    throw err
  }
}

test('allowOut domains open exactly what their names resolve to', { skip: !inet.port && 'no fake internet' }, async (t) => {
  await withSandbox(t, { allowInternetAccess: false, network: { allowOut: ['allowed.test', '*.wild.test'] } }, async (sbx) => {
    assert.deepEqual(await resolve(sbx, 'allowed.test'), [inet.allowed])
    assert.equal(await reaches(sbx, 'allowed.test', inet.port), true, 'allowed name unreachable')
    assert.equal(await reaches(sbx, 'deep.sub.wild.test', inet.port), true, 'wildcard name unreachable')
    // Names outside the list are not even resolved (no DNS tunnel), and
    // their addresses stay closed when learned some other way.
    assert.deepEqual(await resolve(sbx, 'other.test'), [])
    assert.deepEqual(await resolve(sbx, 'wild.test'), [], 'a wildcard opened its apex')
    assert.equal(await reaches(sbx, inet.other, inet.port), false, "other.test's address reached")
    // The only resolver is cubicle's: DNS straight to another server is dropped.
    const direct = await sbx.commands.run(
      `python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(bytes.fromhex('abcd01000001000000000000056f7468657204746573740000010001'), ('${inet.allowed}', 53))
try: s.recv(512); print('answered')
except OSError: print('dropped')"`)
    assert.equal(direct.stdout.trim(), 'dropped')

    // A live change: the name is gone, and so is its address for new connections.
    await sbx.updateNetwork({ allowOut: ['*.wild.test'], allowInternetAccess: false })
    assert.deepEqual(await resolve(sbx, 'allowed.test'), [])
    assert.equal(await reaches(sbx, inet.allowed, inet.port), false, 'a removed name stayed open')
    assert.equal(await reaches(sbx, 'x.wild.test', inet.port), true)
  })
})

test('the default policy reaches the internet, and egress counters move', { skip: !inet.port && 'no fake internet' }, async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    assert.equal(await reaches(sbx, inet.other, inet.port), true, 'default policy: internet unreachable')
    assert.deepEqual(await resolve(sbx, 'other.test'), [inet.other], 'an open sandbox resolves every name')
    await sbx.updateNetwork({ denyOut: [`${inet.other}/32`] })
    assert.equal(await reaches(sbx, inet.other, inet.port), false, 'denyOut did not close')
    // Metrics are sampled every few seconds; wait (bounded) for a sample
    // after the traffic above.
    // The SDK's getMetrics drops fields it does not know: ask the API.
    let m
    for (let i = 0; i < 30; i++) {
      const res = await fetch(`${process.env.E2B_API_URL}/sandboxes/${sbx.sandboxId}/metrics`, {
        headers: { 'X-API-Key': process.env.E2B_API_KEY },
      })
      assert.equal(res.status, 200)
      const ms = await res.json()
      m = ms[ms.length - 1]
      if (m && m.egressPackets > 0 && m.egressDroppedPackets > 0) break
      await new Promise((r) => setTimeout(r, 1000))
    }
    assert.ok(m, 'no metrics')
    assert.ok(m.egressPackets > 0 && m.egressBytes > 0, `no egress counted: ${JSON.stringify(m)}`)
    assert.ok(m.egressDroppedPackets > 0, `no drop counted: ${JSON.stringify(m)}`)
  })
})
