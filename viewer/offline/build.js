// Builds the offline viewer's folder: our page, script and style sheet, the decoders from
// node_modules as classic scripts (no modules, no source maps: the folder is opened from
// disk), and every licence in LICENSES.TXT. The folder is written beside its final name
// and renamed once complete, so a reader never sees half of it.
//
//   node build.js [output folder]      (default: dist/)

'use strict';

const fs = require('fs');
const path = require('path');

const here = __dirname;
const out = path.resolve(process.argv[2] || path.join(here, 'dist'));
const modules = path.join(here, 'node_modules');
// The disc writer and the ZIP take the folder as it is; 3 MB keeps a download with the
// viewer close to one without.
const MAX_TOTAL_BYTES = 3 * 1000 * 1000;

const OWN_FILES = ['index.html', 'viewer.js', 'viewer.css'];

// name in the folder <- package, file in it; a CommonJS file is wrapped to define the
// global ``wrap``, an Emscripten WebAssembly build gets its .wasm inlined as base64 in
// the global ``inline`` (a page opened from disk may not fetch it).
const VENDORED = [
  { name: 'dicomparser.js', pkg: 'dicom-parser', file: 'dist/dicomParser.min.js' },
  { name: 'inflate.js', pkg: 'pako', file: 'dist/pako_inflate.min.js' },
  { name: 'jpegll.js', pkg: 'jpeg-lossless-decoder-js', file: 'release/cjs/lossless.cjs',
    wrap: 'jpegLossless' },
  { name: 'charls.js', pkg: '@cornerstonejs/codec-charls', file: 'dist/charlswasm_decode.js',
    wasm: 'dist/charlswasm_decode.wasm', inline: 'CHARLS_WASM' },
  { name: 'charls-asm.js', pkg: '@cornerstonejs/codec-charls', file: 'dist/charlsjs_decode.js' },
  { name: 'openjpeg.js', pkg: '@cornerstonejs/codec-openjpeg',
    file: 'dist/openjpegwasm_decode.js', wasm: 'dist/openjpegwasm_decode.wasm',
    inline: 'OPENJPEG_WASM' },
  { name: 'openjpeg-asm.js', pkg: '@cornerstonejs/codec-openjpeg',
    file: 'dist/openjpegjs_decode.js' },
];

// Licence texts the packages do not ship themselves: the C libraries compiled into the
// two Emscripten builds, and the MIT grant of codec-openjpeg (declared in its
// package.json, same author and repository as codec-charls).
const EXTRA_LICENCES = path.join(here, 'licenses');

function packageJson(pkg) {
  return JSON.parse(fs.readFileSync(path.join(modules, pkg, 'package.json'), 'utf8'));
}

function withoutSourceMap(code) {
  return code.replace(/\n?\/\/# sourceMappingURL=\S+\s*$/, '\n');
}

// A CommonJS file as a classic script that defines one global.
function wrapCommonJs(code, globalName) {
  return `(function () {\nvar module = { exports: {} };\nvar exports = module.exports;\n${code}\n` +
    `window.${globalName} = module.exports;\n})();\n`;
}

function licenceOf(pkg) {
  const dir = path.join(modules, pkg);
  const name = fs.readdirSync(dir).find((f) => /^licen[cs]e(\.(md|txt))?$/i.test(f));
  return name ? fs.readFileSync(path.join(dir, name), 'utf8').trim() : null;
}

function build() {
  const staging = `${out}.tmp-${process.pid}`;
  fs.rmSync(staging, { recursive: true, force: true });
  fs.mkdirSync(staging, { recursive: true });
  try {
    fill(staging);
  } catch (error) {
    fs.rmSync(staging, { recursive: true, force: true });
    throw error;
  }
  fs.rmSync(out, { recursive: true, force: true });
  fs.renameSync(staging, out);
}

function fill(staging) {
  for (const file of OWN_FILES) {
    fs.copyFileSync(path.join(here, file), path.join(staging, file));
  }

  const notices = [
    'Licences of the software in this folder',
    '=======================================',
    '',
    'index.html, viewer.js, viewer.css: the offline DICOM viewer, MIT licence.',
    '',
  ];
  const noticed = new Set();
  for (const item of VENDORED) {
    const meta = packageJson(item.pkg);
    let code = withoutSourceMap(fs.readFileSync(path.join(modules, item.pkg, item.file), 'utf8'));
    if (item.wrap) code = wrapCommonJs(code, item.wrap);
    if (item.wasm) {
      const wasm = fs.readFileSync(path.join(modules, item.pkg, item.wasm)).toString('base64');
      code += `\nvar ${item.inline} = "${wasm}";\n`;
    }
    if (/sourceMappingURL|^\s*(import|export)\s/m.test(code)) {
      throw new Error(`${item.pkg}: ${item.file} is not usable as a classic script`);
    }
    fs.writeFileSync(path.join(staging, item.name), code);
    if (noticed.has(item.pkg)) continue;
    noticed.add(item.pkg);
    const names = VENDORED.filter((other) => other.pkg === item.pkg).map((other) => other.name);
    notices.push('-'.repeat(78),
      `${names.join(', ')}: ${meta.name} ${meta.version}, ${meta.license} licence`, '');
    const licence = licenceOf(item.pkg);
    if (licence) notices.push(licence, '');
  }
  for (const name of fs.readdirSync(EXTRA_LICENCES).sort()) {
    notices.push('-'.repeat(78),
      fs.readFileSync(path.join(EXTRA_LICENCES, name), 'utf8').trim(), '');
  }
  fs.writeFileSync(path.join(staging, 'LICENSES.TXT'), notices.join('\r\n'));

  const total = fs.readdirSync(staging)
    .reduce((sum, name) => sum + fs.statSync(path.join(staging, name)).size, 0);
  if (total > MAX_TOTAL_BYTES) {
    throw new Error(`the viewer folder is ${total} bytes, more than ${MAX_TOTAL_BYTES}`);
  }
  console.log(`offline viewer: ${out} (${fs.readdirSync(staging).length} files, ${total} bytes)`);
}

build();
