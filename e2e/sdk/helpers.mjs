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
