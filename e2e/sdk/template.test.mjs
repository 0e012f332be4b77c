// Template builds through the SDK's Template builder: from the base
// template with COPY and a RUN that installs a .deb; from a Dockerfile whose
// image is in a registry on loopback; cached steps; and bad input.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Template } from 'e2b'
import { Sandbox } from './helpers.mjs'

const api = process.env.E2B_API_URL
const key = process.env.E2B_API_KEY
const ctx = process.env.CUBICLE_E2E_DEB
const image = process.env.CUBICLE_E2E_IMAGE
const opts = (logs) => ({ cpuCount: 1, memoryMB: 512, onBuildLogs: (e) => logs.push(e) })

async function raw(method, path, body, apiKey = key) {
  const res = await fetch(api + path, { method, body, headers: { 'X-API-KEY': apiKey, 'Content-Type': 'application/json' } })
  const text = await res.text()
  let json
  try { json = JSON.parse(text) } catch { json = undefined }
  return { status: res.status, json, text }
}

test('a template from base: COPY of local files, a RUN that installs a .deb, ENV; the RUN is cached', async (t) => {
  const name = `e2e-deb-${Date.now()}`
  const tmpl = Template({ fileContextPath: ctx }).fromTemplate('base')
    .copy('hello-cubicle_1.0_all.deb', '/tmp/pkg.deb')
    .copy('notes.txt', '/home/user/notes.txt')
    .runCmd('dpkg -i /tmp/pkg.deb && rm /tmp/pkg.deb', { user: 'root' })
    .setEnvs({ BUILT_BY: 'cubicle' })
  const logs = []
  const info = await Template.build(tmpl, name, opts(logs))
  assert.equal(info.name, name)
  assert.ok(logs.some((e) => /hello-cubicle/.test(e.message)), 'the RUN step\'s output is in the build log')
  t.after(() => raw('DELETE', `/templates/${info.templateId}`))

  // The same steps again: the RUN's result comes from the cache.
  const again = []
  const info2 = await Template.build(tmpl, name, opts(again))
  assert.equal(info2.templateId, info.templateId, 'a new build of the same name is the same template')
  assert.ok(again.some((e) => /cached/.test(e.message)), JSON.stringify(again.map((e) => e.message)))

  const sbx = await Sandbox.create(name, { timeoutMs: 120_000 })
  t.after(() => sbx.kill().catch(() => {}))
  assert.equal((await sbx.commands.run('hello-cubicle')).stdout, 'hello from a package\n')
  assert.equal(await sbx.files.read('/home/user/notes.txt'), 'copied from the context\n')
  assert.equal((await sbx.commands.run('echo $BUILT_BY')).stdout.trim(), 'cubicle')
  assert.equal((await sbx.commands.run('test -e /tmp/pkg.deb || echo gone')).stdout.trim(), 'gone')

  // In use: a new build would replace the files under its sandbox.
  await assert.rejects(Template.build(tmpl, name, opts([])), (e) => /in use/.test(e.message))
  assert.equal((await sbx.commands.run('hello-cubicle')).stdout, 'hello from a package\n')
  // In use: it cannot be deleted under its sandbox.
  const del = await raw('DELETE', `/templates/${info.templateId}`)
  assert.equal(del.status, 409, del.text)
})

test('a template from a Dockerfile whose image is in a registry on loopback', async (t) => {
  const name = `e2e-docker-${Date.now()}`
  const tmpl = Template({ fileContextPath: ctx }).fromDockerfile(`FROM ${image}
ENV GREETING=hi
WORKDIR /opt/app
COPY notes.txt ./notes.txt
RUN echo built > /opt/app/built && cat /opt/app/notes.txt
`)
  const logs = []
  const info = await Template.build(tmpl, name, opts(logs))
  t.after(() => raw('DELETE', `/templates/${info.templateId}`))
  const sbx = await Sandbox.create(name, { timeoutMs: 120_000 })
  t.after(() => sbx.kill().catch(() => {}))
  const r = await sbx.commands.run('cat /opt/app/built; cat notes.txt; echo $GREETING $FROM_IMAGE; pwd; id -un')
  assert.equal(r.stdout, 'built\ncopied from the context\nhi yes\n/opt/app\nuser\n')
  const listed = await raw('GET', '/templates')
  assert.ok(listed.json.some((x) => x.templateID === info.templateId), listed.text)
  const alias = await raw('GET', `/templates/aliases/${name}`)
  assert.equal(alias.json?.templateID, info.templateId, alias.text)

  // Another key neither sees nor uses it until its owner makes it public.
  const other = process.env.CUBICLE_E2E_OTHER_API_KEY
  assert.equal((await raw('GET', `/templates/aliases/${name}`, undefined, other)).status, 404)
  await assert.rejects(Sandbox.create(name, { apiKey: other, timeoutMs: 30_000 }), /not found/i)
  assert.equal((await raw('PATCH', `/v2/templates/${info.templateId}`, '{"public":true}', other)).status, 404)
  const patched = await raw('PATCH', `/v2/templates/${info.templateId}`, '{"public":true}')
  assert.equal(patched.status, 200, patched.text)
  assert.deepEqual(patched.json, { names: [name] })
  assert.equal((await raw('GET', `/templates/aliases/${name}`, undefined, other)).json?.public, true)
  const theirs = await Sandbox.create(name, { apiKey: other, timeoutMs: 60_000 })
  t.after(() => theirs.kill().catch(() => {}))
  assert.equal((await theirs.commands.run('cat /opt/app/built')).stdout, 'built\n')
  assert.equal((await raw('DELETE', `/templates/${info.templateId}`, undefined, other)).status, 404, 'only its owner deletes it')
})

test('a failing RUN fails the build with that step\'s log; a missing image too', async () => {
  const failing = Template().fromTemplate('base').runCmd('echo about to fail; exit 7')
  await assert.rejects(Template.build(failing, `e2e-fail-${Date.now()}`, { cpuCount: 1, memoryMB: 512 }),
    (e) => e.name === 'BuildError' && /status 7/.test(e.message), 'the RUN\'s exit status')
  const missing = Template().fromImage(image.replace('busybox:1', 'nothing-here:1'))
  await assert.rejects(Template.build(missing, `e2e-missing-${Date.now()}`, { cpuCount: 1, memoryMB: 512 }),
    (e) => e.name === 'BuildError' && /not found/i.test(e.message))
})

test('template API bad input gets E2B\'s error shape', async () => {
  const created = await raw('POST', '/v3/templates', JSON.stringify({ name: `e2e-bad-${Date.now()}` }))
  assert.equal(created.status, 202, created.text)
  const { templateID, buildID } = created.json
  const cases = [
    ['bad name', 'POST', '/v3/templates', '{"name":"Not A Name!"}', 400],
    ['taken built-in name', 'POST', '/v3/templates', '{"name":"base"}', 409],
    ['unknown step type', 'POST', `/v2/templates/${templateID}/builds/${buildID}`, '{"fromTemplate":"base","steps":[{"type":"FROB","args":[]}]}', 400],
    ['two bases', 'POST', `/v2/templates/${templateID}/builds/${buildID}`, '{"fromTemplate":"base","fromImage":"x:1"}', 400],
    ['unknown build', 'GET', `/templates/${templateID}/builds/aaaaaaaa-0000-0000-0000-000000000000/status`, undefined, 404],
    ['bad files hash', 'GET', `/templates/${templateID}/files/xyz`, undefined, 400],
    ['someone else\'s template files', 'GET', `/templates/aaaaaaaaaaaaaaaaaaaa/files/${'0'.repeat(64)}`, undefined, 404],
    ['unknown alias', 'GET', '/templates/aliases/no-such-template', undefined, 404],
  ]
  for (const [what, method, path, body, want] of cases) {
    const r = await raw(method, path, body)
    assert.equal(r.status, want, `${what}: ${r.text}`)
    assert.equal(r.json?.code, want, `${what}: error shape ${r.text}`)
    assert.equal(typeof r.json?.message, 'string', `${what}: ${r.text}`)
  }
  // An upload URL works once signed, and refuses a corrupt tar.
  const files = await raw('GET', `/templates/${templateID}/files/${'a'.repeat(64)}`)
  assert.equal(files.status, 201, files.text)
  assert.equal(files.json.present, false)
  const put = await fetch(files.json.url, { method: 'PUT', body: 'this is not a tar' })
  assert.equal(put.status, 400)
  const forged = await fetch(files.json.url.replace(/signature=[0-9a-f]+/, 'signature=00'), { method: 'PUT', body: '' })
  assert.equal(forged.status, 403)
})
