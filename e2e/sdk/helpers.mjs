// Shared by the test files: the SDK under test and small utilities.
import { Sandbox } from 'e2b'

export { Sandbox }

// Every sandbox a test makes is killed when the test ends, pass or fail.
export async function withSandbox(t, opts, fn) {
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000, ...opts })
  t.after(() => sbx.kill().catch(() => {}))
  return fn(sbx)
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

// waitFor polls cond until it is true or the bound passes. A poll that
// throws counts as "not yet": a request in flight when a sandbox is killed
// is reset, which is what the SDKs expect of a dying sandbox.
export async function waitFor(cond, { timeoutMs = 10_000, stepMs = 100, what = 'condition' } = {}) {
  const end = Date.now() + timeoutMs
  let last
  while (Date.now() < end) {
    try {
      if (await cond()) return
    } catch (err) {
      last = err
    }
    await sleep(stepMs)
  }
  throw new Error(`timed out waiting for ${what}${last ? `; last error: ${last.message}` : ''}`)
}

// viaHost sends a request to the proxy addressed the way a browser would
// address it, by host name alone (<port>-<sandboxID>.<domain>), with no SDK
// headers: node:http lets the Host header be set, which fetch does not.
export async function viaHost(sbx, port, { method = 'GET', path = '/', headers = {}, body } = {}) {
  const { request } = await import('node:http')
  const proxy = new URL(process.env.E2B_SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = request({
      host: proxy.hostname,
      port: proxy.port,
      method,
      path,
      headers: { host: sbx.getHost(port), ...headers },
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c) => { text += c })
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text }))
    })
    req.on('error', reject)
    if (body !== undefined) req.write(body)
    req.end()
  })
}
