// network.allowPublicTraffic: false, as the E2B SDK's own test uses it: a
// port served in the sandbox answers 403 without the traffic access token
// and 200 with it in e2b-traffic-access-token, while envd (which has its own
// token, and to which the SDK never sends the traffic token) keeps working.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { viaHost, waitFor, withSandbox } from './helpers.mjs'

const PORT = 8000

const direct = (sbx, headers = {}) => fetch(`${process.env.E2B_SANDBOX_URL}/`, {
  headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': String(PORT), ...headers },
})

test('allowPublicTraffic false: sandbox ports demand the traffic access token', async (t) => {
  await withSandbox(t, { network: { allowPublicTraffic: false } }, async (sbx) => {
    assert.ok(sbx.trafficAccessToken, 'no trafficAccessToken from create')
    const token = sbx.trafficAccessToken
    // envd works through the SDK without the traffic token.
    await sbx.commands.run(`cd /tmp && python3 -m http.server ${PORT}`, { background: true })
    await waitFor(async () => (await direct(sbx, { 'e2b-traffic-access-token': token })).status === 200, { what: 'the http server' })

    for (const [name, headers] of [['no token', {}], ['a wrong token', { 'e2b-traffic-access-token': 'wrong' }], ['the envd token instead', { 'e2b-traffic-access-token': sbx.envdAccessToken }]]) {
      const res = await direct(sbx, headers)
      assert.equal(res.status, 403, `${name}: ${res.status}`)
      const body = await res.json()
      assert.equal(body.code, 403)
      assert.equal(body.sandboxId, sbx.sandboxId)
      assert.match(body.message, /traffic access token/)
      const byHost = await viaHost(sbx, PORT, { headers })
      assert.equal(byHost.status, 403, `${name}, by host name: ${byHost.status}`)
    }
    const ok = await viaHost(sbx, PORT, { headers: { 'e2b-traffic-access-token': token } })
    assert.equal(ok.status, 200)
    assert.match(ok.text, /Directory listing/)

    // envd still answers the SDK.
    assert.equal((await sbx.commands.run('echo envd')).stdout, 'envd\n')
    assert.ok(await sbx.files.write('/tmp/f', 'x'))
  })
})

test('allowPublicTraffic default: sandbox ports are public, no token is handed out', async (t) => {
  await withSandbox(t, {}, async (sbx) => {
    assert.equal(sbx.trafficAccessToken, undefined)
    await sbx.commands.run(`cd /tmp && python3 -m http.server ${PORT}`, { background: true })
    await waitFor(async () => (await direct(sbx)).status === 200, { what: 'the http server' })
    assert.equal((await viaHost(sbx, PORT)).status, 200)
  })
})
