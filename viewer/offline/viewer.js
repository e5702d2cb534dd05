/*
 * The DICOM viewer that goes on recipients' media (a ZIP or a disc laid out as IHE PDI:
 * DICOMDIR at the root, the images under IMAGES/, this viewer under IHE_PDI/).
 *
 * It is opened from disk (file://), where a page may not read its neighbours: so classic
 * scripts only, no fetch, no workers, no modules. The recipient picks the media's folder
 * once and the browser hands over File objects, read here and never sent anywhere.
 *
 * What is read: the DICOMDIR (PS3.10 7.2, PS3.3 Annex F) when there is one, else the
 * header of every file. Pixel data: native (PS3.5 8), RLE (PS3.5 Annex G) decoded here,
 * JPEG baseline by the browser's own decoder, JPEG Lossless, JPEG-LS and JPEG 2000 by the
 * bundled decoders, loaded on first use.
 */
(function () {
  'use strict';

  // --- Every text the viewer shows, in one place for translation -------------------------

  var TEXT = {
    appName: 'DICOM image viewer',
    offlineBadge: 'offline',
    skipToImage: 'Skip to the image',
    openAnother: 'Open another folder',
    startTitle: 'Choose the folder of this disc or download',
    startLead: 'This viewer shows the medical images stored beside it. It runs in this ' +
      'browser only: it reads the files on this computer and sends nothing over the network.',
    stepChooseNamed: 'Press “Choose the folder” and pick the folder {folder}: the one that ' +
      'holds INDEX.HTM and DICOMDIR.',
    stepChooseDisc: 'Press “Choose the folder” and pick the disc itself ({folder}): the ' +
      'drive that holds INDEX.HTM and DICOMDIR.',
    stepChoose: 'Press “Choose the folder” and pick the top folder of the disc or of the ' +
      'unzipped download: the one that holds INDEX.HTM and DICOMDIR.',
    stepPermission: 'Your browser asks for permission to read that folder, and may call it ' +
      'an “upload”. Nothing leaves this computer: a web page may only read the files you ' +
      'choose, and this one has no network access at all.',
    stepView: 'The studies and series appear on the left. Drag on the image to change ' +
      'brightness and contrast; scroll with the mouse wheel, the arrow keys or the slider.',
    chooseFolder: 'Choose the folder…',
    folderInputLabel: 'Folder of the disc or download',
    dropHere: 'or drag the folder here',
    noFolderPicker: 'Cannot choose a folder on this device?',
    chooseFiles: 'Choose all its files instead',
    filesInputLabel: 'Files of the disc or download',
    readingFiles: 'Reading the folder: {count} files…',
    readingIndex: 'Reading the index of the images (DICOMDIR)…',
    scanning: 'Looking for images: {done} of {total} files…',
    emptyFolder: 'The folder you chose is empty. Choose the top folder of the disc or ' +
      'download: the one that holds INDEX.HTM and DICOMDIR.',
    noImages: 'No DICOM images were found in the folder you chose. Choose the top folder of ' +
      'the disc or download (the one that holds INDEX.HTM and DICOMDIR), not a folder inside it.',
    dicomdirUnreadable: 'The index of the images (DICOMDIR) could not be read ({reason}); ' +
      'each file was read instead.',
    missingFiles: '{count} of the images listed in DICOMDIR are not in the folder you ' +
      'chose; they are not shown.',
    skippedFiles: '{count} files that are not images (reports, presentation states and ' +
      'the like) are not shown.',
    unreadableFiles: '{count} files that start like DICOM files could not be read; they ' +
      'are not shown.',
    oldBrowser: 'This browser is too old for this viewer. Open INDEX.HTM in a current ' +
      'version of Chrome, Edge, Firefox or Safari, or open the folder with any DICOM viewer.',
    seriesPanelLabel: 'Studies and series',
    unnamedPatient: 'Unnamed patient',
    patientId: 'ID {id}',
    born: 'born {date}',
    sexLabel: { M: 'male', F: 'female', O: 'other' },
    studyMeta: '{modalities} · {series} · accession {accession}',
    studyMetaNoAccession: '{modalities} · {series}',
    noDescription: 'No description',
    noDate: 'date unknown',
    seriesCount: { one: '1 series', other: '{n} series' },
    imageCount: { one: '1 image', other: '{n} images' },
    frameCount: { one: '1 frame', other: '{n} frames' },
    seriesLabel: 'Series {number}',
    seriesUntitled: 'Series {number}',
    toolbarLabel: 'Image tools',
    dragLabel: 'Drag to',
    toolWindow: 'Contrast',
    toolPan: 'Move',
    toolZoom: 'Zoom',
    presetsLabel: 'Window',
    presetDefault: 'Image default',
    presetFull: 'Full range',
    presetSoftTissue: 'Soft tissue',
    presetLung: 'Lung',
    presetBone: 'Bone',
    presetBrain: 'Brain',
    presetTitle: 'Window width {ww}, level {wc} (key {key})',
    viewLabel: 'View',
    invert: 'Invert',
    zoomIn: 'Zoom in',
    zoomOut: 'Zoom out',
    reset: 'Reset',
    viewportLabel: 'Image. Arrow keys change image, drag changes contrast.',
    imageAlt: '{modality} image {index} of {total}, {series}; window width {ww}, level {wc}',
    previousImage: 'Previous image',
    nextImage: 'Next image',
    imageSlider: 'Image',
    sliceOf: 'Image {index} of {total}',
    frameOf: 'frame {frame} of {frames}',
    windowShort: 'W {ww}  L {wc}',
    zoomShort: 'Zoom {zoom}%',
    locationShort: 'Location {loc} mm',
    thicknessShort: 'Thickness {thick} mm',
    loadingImage: 'Loading the image…',
    compressedUnsupported: 'This image is compressed as {syntax}, which this viewer cannot ' +
      'show. Open the folder in a DICOM viewer: most read the DICOMDIR file.',
    notAnImage: 'This file holds no image ({what}). Open the folder in a DICOM viewer to see it.',
    unreadable: 'This file could not be read ({reason}). Open the folder in a DICOM viewer.',
    fileMissing: 'This image is listed in DICOMDIR but is not in the folder you chose.',
    framesUnknown: 'the compressed frames cannot be told apart',
    decoderMissing: 'the decoder for it is missing from this folder',
    noPixelData: 'it has no pixel data',
    helpTitle: 'Keyboard, mouse and touch',
    help: [
      'Mouse wheel, ↑ ↓ or ← →: previous or next image; Page Up / Page Down: 10 images; ' +
        'Home / End: first or last image',
      'Drag: the tool chosen above (contrast, move or zoom); right or middle button, or ' +
        'Shift + drag: move; Ctrl + drag or Ctrl + wheel: zoom',
      'Contrast: drag left or right for the window width, up or down for the level',
      'Keys 1 to 9: the window buttons in order; I: invert; + and −: zoom; 0 or R: reset',
      'Touch: one finger uses the chosen tool, two fingers pinch to zoom and move'
    ]
  };

  function t(key, values) {
    var text = TEXT[key];
    return fill(text, values);
  }

  function fill(text, values) {
    return String(text).replace(/\{(\w+)\}/g, function (whole, name) {
      return values && values[name] !== undefined ? String(values[name]) : whole;
    });
  }

  function plural(key, n) {
    var forms = TEXT[key];
    return fill(n === 1 ? forms.one : forms.other, { n: n });
  }

  // --- Transfer syntaxes (PS3.5 Annex A, PS3.6 Annex A) ----------------------------------

  var NATIVE = {
    '1.2.840.10008.1.2': true,
    '1.2.840.10008.1.2.1': true,
    '1.2.840.10008.1.2.2': true,
    '1.2.840.10008.1.2.1.99': true
  };
  var BIG_ENDIAN = '1.2.840.10008.1.2.2';
  var DEFLATED = '1.2.840.10008.1.2.1.99';

  // How each compressed syntax is decoded here, and its name for messages.
  var COMPRESSED = {
    '1.2.840.10008.1.2.5': ['rle', 'RLE Lossless'],
    '1.2.840.10008.1.2.4.50': ['jpeg', 'JPEG Baseline'],
    '1.2.840.10008.1.2.4.51': ['jpeg-extended', 'JPEG Extended (12-bit)'],
    '1.2.840.10008.1.2.4.57': ['jpeg-lossless', 'JPEG Lossless'],
    '1.2.840.10008.1.2.4.70': ['jpeg-lossless', 'JPEG Lossless'],
    '1.2.840.10008.1.2.4.80': ['jpeg-ls', 'JPEG-LS Lossless'],
    '1.2.840.10008.1.2.4.81': ['jpeg-ls', 'JPEG-LS Near-Lossless'],
    '1.2.840.10008.1.2.4.90': ['j2k', 'JPEG 2000 Lossless'],
    '1.2.840.10008.1.2.4.91': ['j2k', 'JPEG 2000'],
    '1.2.840.10008.1.2.4.92': ['j2k', 'JPEG 2000 Part 2 Multi-component Lossless'],
    '1.2.840.10008.1.2.4.93': ['j2k', 'JPEG 2000 Part 2 Multi-component'],
    '1.2.840.10008.1.2.4.201': ['j2k', 'High-Throughput JPEG 2000 Lossless'],
    '1.2.840.10008.1.2.4.202': ['j2k', 'High-Throughput JPEG 2000 (RPCL) Lossless'],
    '1.2.840.10008.1.2.4.203': ['j2k', 'High-Throughput JPEG 2000'],
    '1.2.840.10008.1.2.4.52': [null, 'JPEG Extended (Process 3 and 5)'],
    '1.2.840.10008.1.2.4.53': [null, 'JPEG Spectral Selection'],
    '1.2.840.10008.1.2.4.55': [null, 'JPEG Full Progression'],
    '1.2.840.10008.1.2.4.58': [null, 'JPEG Lossless (Process 15)'],
    '1.2.840.10008.1.2.4.94': [null, 'JPIP Referenced'],
    '1.2.840.10008.1.2.4.95': [null, 'JPIP Referenced Deflate'],
    '1.2.840.10008.1.2.4.100': [null, 'MPEG-2 video'],
    '1.2.840.10008.1.2.4.101': [null, 'MPEG-2 video'],
    '1.2.840.10008.1.2.4.102': [null, 'MPEG-4 AVC/H.264 video'],
    '1.2.840.10008.1.2.4.103': [null, 'MPEG-4 AVC/H.264 video'],
    '1.2.840.10008.1.2.4.104': [null, 'MPEG-4 AVC/H.264 video'],
    '1.2.840.10008.1.2.4.105': [null, 'MPEG-4 AVC/H.264 video'],
    '1.2.840.10008.1.2.4.106': [null, 'MPEG-4 AVC/H.264 video'],
    '1.2.840.10008.1.2.4.107': [null, 'HEVC/H.265 video'],
    '1.2.840.10008.1.2.4.108': [null, 'HEVC/H.265 video'],
    '1.2.840.10008.1.2.4.110': [null, 'JPEG XL Lossless'],
    '1.2.840.10008.1.2.4.111': [null, 'JPEG XL JPEG Recompression'],
    '1.2.840.10008.1.2.4.112': [null, 'JPEG XL']
  };

  // The bundled decoders: the classic script, the global it defines, and for the two
  // Emscripten builds the global holding their WebAssembly (inlined as base64: a page
  // opened from disk may not fetch a .wasm file), with a plain JavaScript build to fall
  // back on where WebAssembly is switched off.
  var CODECS = {
    'jpeg-lossless': { src: 'jpegll.js', global: 'jpegLossless' },
    'jpeg-ls': { src: 'charls.js', global: 'CharLSWASM', wasm: 'CHARLS_WASM',
                 fallback: { src: 'charls-asm.js', global: 'CharLS' } },
    j2k: { src: 'openjpeg.js', global: 'OpenJPEGWASM', wasm: 'OPENJPEG_WASM',
           fallback: { src: 'openjpeg-asm.js', global: 'OpenJPEGJS' } }
  };

  // Storage SOP Classes that hold no image, for a plain-language message (PS3.4 B.5).
  var NON_IMAGE_CLASSES = {
    '1.2.840.10008.5.1.4.1.1.88': 'a structured report',
    '1.2.840.10008.5.1.4.1.1.104.1': 'a PDF document',
    '1.2.840.10008.5.1.4.1.1.11': 'a presentation state',
    '1.2.840.10008.5.1.4.1.1.66': 'raw data',
    '1.2.840.10008.5.1.4.1.1.481': 'radiotherapy data',
    '1.2.840.10008.5.1.4.1.1.9': 'a waveform',
    '1.2.840.10008.5.1.4.1.1.7': 'a secondary capture'
  };

  // --- Character sets (PS3.5 6.1, PS3.3 C.12.1.1.2) --------------------------------------

  // Defined terms without code extensions, as WHATWG encoding labels.
  var SINGLE_CHARSETS = {
    '': 'windows-1252', 'ISO_IR 6': 'windows-1252', 'ISO_IR 100': 'iso-8859-1',
    'ISO_IR 101': 'iso-8859-2', 'ISO_IR 109': 'iso-8859-3', 'ISO_IR 110': 'iso-8859-4',
    'ISO_IR 144': 'iso-8859-5', 'ISO_IR 127': 'iso-8859-6', 'ISO_IR 126': 'iso-8859-7',
    'ISO_IR 138': 'iso-8859-8', 'ISO_IR 148': 'iso-8859-9', 'ISO_IR 203': 'iso-8859-15',
    'ISO_IR 13': 'shift_jis', 'ISO_IR 166': 'windows-874', 'ISO_IR 192': 'utf-8',
    GB18030: 'gb18030', GBK: 'gbk'
  };
  // Defined terms with code extensions: what each designates to G0 and G1 when it is the
  // first value (the state at the start of a value and after each delimiter).
  var ISO2022_CHARSETS = {
    'ISO 2022 IR 6': { g0: 'ascii', g1: null },
    'ISO 2022 IR 100': { g0: 'ascii', g1: 'iso-8859-1' },
    'ISO 2022 IR 101': { g0: 'ascii', g1: 'iso-8859-2' },
    'ISO 2022 IR 109': { g0: 'ascii', g1: 'iso-8859-3' },
    'ISO 2022 IR 110': { g0: 'ascii', g1: 'iso-8859-4' },
    'ISO 2022 IR 144': { g0: 'ascii', g1: 'iso-8859-5' },
    'ISO 2022 IR 127': { g0: 'ascii', g1: 'iso-8859-6' },
    'ISO 2022 IR 126': { g0: 'ascii', g1: 'iso-8859-7' },
    'ISO 2022 IR 138': { g0: 'ascii', g1: 'iso-8859-8' },
    'ISO 2022 IR 148': { g0: 'ascii', g1: 'iso-8859-9' },
    'ISO 2022 IR 203': { g0: 'ascii', g1: 'iso-8859-15' },
    'ISO 2022 IR 13': { g0: 'ascii', g1: 'shift_jis' },
    'ISO 2022 IR 166': { g0: 'ascii', g1: 'windows-874' },
    'ISO 2022 IR 87': { g0: 'jisx0208', g1: null },
    'ISO 2022 IR 159': { g0: 'jisx0212', g1: null },
    'ISO 2022 IR 149': { g0: 'ascii', g1: 'euc-kr' },
    'ISO 2022 IR 58': { g0: 'ascii', g1: 'gbk' }
  };
  // The escape sequences of PS3.3 Tables C.12-3 and C.12-4 (after ESC), and what they
  // designate.
  var ESCAPES = {
    '(B': ['g0', 'ascii'], '(J': ['g0', 'ascii'], ')I': ['g1', 'shift_jis'],
    '$B': ['g0', 'jisx0208'], '$@': ['g0', 'jisx0208'], '$(D': ['g0', 'jisx0212'],
    '$)C': ['g1', 'euc-kr'], '$)A': ['g1', 'gbk'],
    '-A': ['g1', 'iso-8859-1'], '-B': ['g1', 'iso-8859-2'], '-C': ['g1', 'iso-8859-3'],
    '-D': ['g1', 'iso-8859-4'], '-L': ['g1', 'iso-8859-5'], '-G': ['g1', 'iso-8859-6'],
    '-F': ['g1', 'iso-8859-7'], '-H': ['g1', 'iso-8859-8'], '-M': ['g1', 'iso-8859-9'],
    '-T': ['g1', 'windows-874'], '-b': ['g1', 'iso-8859-15']
  };
  // PS3.5 6.1.2.5.3: the initial designations return after these (^ = \ CR LF TAB FF).
  var DELIMITERS = [0x5e, 0x3d, 0x5c, 0x0d, 0x0a, 0x09, 0x0c];
  var ESC = 0x1b;

  var textDecoders = {};
  function textDecoder(label) {
    if (!textDecoders[label]) {
      try {
        textDecoders[label] = new TextDecoder(label);
      } catch (unknownLabel) {
        textDecoders[label] = new TextDecoder('windows-1252');
      }
    }
    return textDecoders[label];
  }

  function decodeText(bytes, charsets) {
    var terms = charsets && charsets.length ? charsets : [''];
    var iso2022 = terms.some(function (term) { return term.indexOf('ISO 2022') === 0; });
    if (!iso2022) {
      return textDecoder(SINGLE_CHARSETS[terms[0]] || 'windows-1252').decode(bytes);
    }
    var initial = ISO2022_CHARSETS[terms[0]] || ISO2022_CHARSETS['ISO 2022 IR 6'];
    var state = { g0: initial.g0, g1: initial.g1 };
    var out = '';
    var start = 0;
    function flush(end) {
      if (end > start) out += decodeRun(bytes.subarray(start, end), state);
      start = end;
    }
    for (var i = 0; i < bytes.length; i++) {
      var b = bytes[i];
      if (b === ESC) {
        flush(i);
        var j = i + 1;
        while (j < bytes.length && bytes[j] >= 0x20 && bytes[j] <= 0x2f) j++;
        var sequence = String.fromCharCode.apply(null, bytes.subarray(i + 1, j + 1));
        var designation = ESCAPES[sequence];
        if (designation) state[designation[0]] = designation[1];
        i = j;
        start = j + 1;
      } else if (state.g0 === 'jisx0208' || state.g0 === 'jisx0212') {
        i++; // two bytes per character
      } else if (DELIMITERS.indexOf(b) >= 0) {
        flush(i + 1);
        state.g0 = initial.g0;
        state.g1 = initial.g1;
      }
    }
    flush(bytes.length);
    return out;
  }

  function decodeRun(run, state) {
    if (state.g0 === 'jisx0208') {
      var wrapped = new Uint8Array(run.length + 6);
      wrapped.set([ESC, 0x24, 0x42]);
      wrapped.set(run, 3);
      wrapped.set([ESC, 0x28, 0x42], run.length + 3);
      // A decoder of its own: a stateful decoder may carry its state over from the last
      // value in some browsers.
      return new TextDecoder('iso-2022-jp').decode(wrapped);
    }
    if (state.g0 === 'jisx0212') { // no browser decodes JIS X 0212
      return new Array(Math.ceil(run.length / 2) + 1).join('\ufffd');
    }
    return textDecoder(state.g1 || 'windows-1252').decode(run);
  }

  // --- Reading data sets -----------------------------------------------------------------

  function charsetsOf(dataSet, inherited) {
    var value = dataSet.string('x00080005');
    if (!value) return inherited || [];
    return value.split('\\').map(function (term) { return term.trim(); });
  }

  function text(dataSet, tag, charsets) {
    var element = dataSet.elements[tag];
    if (!element || !element.length) return '';
    var bytes = dataSet.byteArray.subarray(element.dataOffset, element.dataOffset + element.length);
    return decodeText(bytes, charsets).replace(/^[\s\0]+|[\s\0]+$/g, '');
  }

  function str(dataSet, tag) {
    var element = dataSet.elements[tag];
    if (!element || !element.length) return '';
    return (dataSet.string(tag) || '').trim();
  }

  function num(dataSet, tag, index) {
    var value = str(dataSet, tag);
    if (!value) return null;
    var parts = value.split('\\');
    var n = parseFloat(parts[index || 0]);
    return isFinite(n) ? n : null;
  }

  function nums(dataSet, tag) {
    var value = str(dataSet, tag);
    if (!value) return [];
    return value.split('\\').map(parseFloat).filter(isFinite);
  }

  function us(dataSet, tag, fallback) {
    var element = dataSet.elements[tag];
    if (!element || element.length < 2) return fallback;
    return dataSet.uint16(tag);
  }

  function errorText(error) {
    if (!error) return '';
    if (error.exception) return errorText(error.exception);
    return String(error.message || error);
  }

  function UserError(message) {
    var error = new Error(message);
    error.forUser = true;
    return error;
  }

  // pako, loaded on first use: unlike the browsers' DecompressionStream it stops at the
  // end of the deflate stream, where some writers leave a few more bytes.
  function inflateRaw(bytes) {
    return loadScript('inflate.js', 'pako').then(function (pako) {
      return pako.inflateRaw(bytes);
    });
  }

  // A Part 10 file (PS3.10 7.1); the Deflated Explicit VR Little Endian data set is
  // inflated first (PS3.5 A.5).
  // The data set gets the transfer syntax as ``syntax``: once inflated, the File Meta
  // Information's offsets no longer point into the data set's bytes.
  function parseFile(bytes, untilPixels) {
    var options = untilPixels ? { untilTag: 'x7fe00010' } : {};
    var meta = dicomParser.readPart10Header(bytes);
    var syntax = (meta.string('x00020010') || '').trim();
    var parsed;
    if (syntax !== DEFLATED) {
      parsed = Promise.resolve(dicomParser.parseDicom(bytes, options));
    } else {
      parsed = inflateRaw(bytes.subarray(meta.position)).then(function (inflated) {
        options.inflater = function () { return inflated; };
        return dicomParser.parseDicom(bytes, options);
      });
    }
    return parsed.then(function (dataSet) {
      dataSet.syntax = syntax;
      return dataSet;
    });
  }

  function hasPreamble(bytes) {
    return bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49 &&
      bytes[130] === 0x43 && bytes[131] === 0x4d;
  }

  var HEADER_BYTES = 64 * 1024;

  // The data set up to the pixel data, from the first bytes of the file when they hold it.
  function readHeader(file) {
    var size = Math.min(file.size, HEADER_BYTES);
    return file.slice(0, size).arrayBuffer().then(function (buffer) {
      var bytes = new Uint8Array(buffer);
      if (!hasPreamble(bytes)) return null;
      return parseFile(bytes, true).catch(function (error) {
        if (size === file.size) throw error;
        return file.arrayBuffer().then(function (whole) {
          return parseFile(new Uint8Array(whole), true);
        });
      });
    });
  }

  // --- The picked folder -----------------------------------------------------------------

  // A path as a disc may present it: any case, "IM1.", "IM1;1" or "IM1.;1" for "IM1".
  function normalComponent(component) {
    return component.toUpperCase().replace(/;\d*$/, '').replace(/\.$/, '');
  }

  function normalPath(path) {
    return path.split('/').filter(Boolean).map(normalComponent).join('/');
  }

  function indexFiles(entries) {
    var byPath = new Map();
    var byName = new Map();
    entries.forEach(function (entry) {
      var path = normalPath(entry.path);
      byPath.set(path, entry);
      var name = path.split('/').pop();
      byName.set(name, byName.has(name) ? null : entry);
    });
    return { entries: entries, byPath: byPath, byName: byName };
  }

  function resolveFileId(index, base, components) {
    var path = normalPath((base ? base + '/' : '') + components.join('/'));
    var found = index.byPath.get(path);
    if (found) return found;
    // Files chosen one by one carry no folders: find them by name when it is unique.
    return index.byName.get(normalComponent(components[components.length - 1])) || null;
  }

  function entriesFromInput(fileList) {
    return Array.prototype.map.call(fileList, function (file) {
      return { path: file.webkitRelativePath || file.name, file: file };
    });
  }

  function readAllEntries(reader) {
    return new Promise(function (resolve, reject) {
      var all = [];
      (function next() {
        reader.readEntries(function (batch) {
          if (!batch.length) return resolve(all);
          all = all.concat(batch);
          next();
        }, reject);
      })();
    });
  }

  function walkEntry(entry, out) {
    if (entry.isFile) {
      return new Promise(function (resolve) {
        entry.file(function (file) {
          out.push({ path: entry.fullPath.replace(/^\//, ''), file: file });
          resolve();
        }, function () { resolve(); });
      });
    }
    if (entry.isDirectory) {
      return readAllEntries(entry.createReader()).then(function (children) {
        return children.reduce(function (chain, child) {
          return chain.then(function () { return walkEntry(child, out); });
        }, Promise.resolve());
      });
    }
    return Promise.resolve();
  }

  function entriesFromDrop(dataTransfer) {
    var roots = [];
    var items = dataTransfer.items || [];
    for (var i = 0; i < items.length; i++) {
      var entry = items[i].webkitGetAsEntry && items[i].webkitGetAsEntry();
      if (entry) roots.push(entry);
    }
    if (!roots.length) return Promise.resolve(entriesFromInput(dataTransfer.files || []));
    var out = [];
    return roots.reduce(function (chain, root) {
      return chain.then(function () { return walkEntry(root, out); });
    }, Promise.resolve()).then(function () { return out; });
  }

  // --- The model: patients, studies, series, images --------------------------------------

  function newModel() {
    return { patients: [], byPatient: new Map(), byStudy: new Map(), bySeries: new Map(),
             missing: 0, skipped: 0, unreadable: 0, notices: [] };
  }

  function addPatient(model, fields) {
    var key = fields.id + '|' + fields.name;
    var patient = model.byPatient.get(key);
    if (!patient) {
      patient = Object.assign({ studies: [] }, fields);
      model.byPatient.set(key, patient);
      model.patients.push(patient);
    }
    return patient;
  }

  function addStudy(model, patient, fields) {
    var key = fields.uid || ('study' + model.byStudy.size);
    var study = model.byStudy.get(key);
    if (!study) {
      study = Object.assign({ series: [], patient: patient }, fields);
      model.byStudy.set(key, study);
      patient.studies.push(study);
    }
    return study;
  }

  function addSeries(model, study, fields) {
    var key = (fields.uid || ('series' + model.bySeries.size)) + '|' + study.uid;
    var series = model.bySeries.get(key);
    if (!series) {
      series = Object.assign({ images: [], study: study, stack: null }, fields);
      model.bySeries.set(key, series);
      study.series.push(series);
    }
    return series;
  }

  function sortModel(model) {
    model.patients.forEach(function (patient) {
      // Newest study first, as the Share Inbox lists them.
      patient.studies.sort(function (a, b) {
        return (b.date + b.time).localeCompare(a.date + a.time);
      });
      patient.studies.forEach(function (study) {
        study.series.sort(function (a, b) {
          return (a.number === null ? 1e9 : a.number) - (b.number === null ? 1e9 : b.number);
        });
        study.series.forEach(function (series) {
          series.images.sort(function (a, b) {
            return (a.instanceNumber === null ? 1e9 : a.instanceNumber) -
              (b.instanceNumber === null ? 1e9 : b.instanceNumber) || a.order - b.order;
          });
        });
      });
    });
  }

  // PS3.3 F.3.2.2: directory records are items of the Directory Record Sequence, linked by
  // the offsets of their next sibling and of their first child, counted from the first
  // byte of the file. A record whose in-use flag is 0000H is inactive.
  function readDicomdir(model, dataSet, index, base) {
    var sequence = dataSet.elements.x00041220;
    var items = sequence && sequence.items ? sequence.items : [];
    var charsets = charsetsOf(dataSet);
    var byOffset = new Map();
    items.forEach(function (item) { byOffset.set(item.dataOffset - 8, item); });

    function chain(offset) {
      var out = [];
      var seen = new Set();
      while (offset && byOffset.has(offset) && !seen.has(offset)) {
        seen.add(offset);
        var item = byOffset.get(offset);
        out.push(item);
        offset = item.dataSet.uint32('x00041400');
      }
      return out;
    }
    function children(item) {
      var lower = item.dataSet.uint32('x00041420');
      return lower ? chain(lower) : [];
    }
    function inUse(item) {
      var element = item.dataSet.elements.x00041410;
      return !element || item.dataSet.uint16('x00041410') !== 0;
    }
    function type(item) {
      return str(item.dataSet, 'x00041430').toUpperCase();
    }

    var tree = chain(dataSet.uint32('x00041200'));
    if (!tree.length && items.length) tree = sequentialTree(items, type);
    var order = 0;

    function visitImages(series, records) {
      records.forEach(function (record) {
        if (!inUse(record)) return;
        var ds = record.dataSet;
        var fileId = str(ds, 'x00041500');
        if (type(record) !== 'IMAGE' || !fileId) {
          if (fileId) model.skipped += 1;
          return;
        }
        var components = fileId.split('\\').map(function (c) { return c.trim(); });
        var entry = resolveFileId(index, base, components);
        series.images.push({
          file: entry && entry.file, path: entry ? entry.path : components.join('/'),
          instanceNumber: num(ds, 'x00200013'), order: order++, info: null
        });
        if (!entry) model.missing += 1;
      });
    }

    tree.forEach(function (patientRecord) {
      if (!inUse(patientRecord) || type(patientRecord) !== 'PATIENT') return;
      var pds = patientRecord.dataSet;
      var pcs = charsetsOf(pds, charsets);
      var patient = addPatient(model, {
        name: text(pds, 'x00100010', pcs), id: text(pds, 'x00100020', pcs),
        birthDate: str(pds, 'x00100030'), sex: str(pds, 'x00100040')
      });
      (patientRecord.kids || children(patientRecord)).forEach(function (studyRecord) {
        if (!inUse(studyRecord) || type(studyRecord) !== 'STUDY') return;
        var sds = studyRecord.dataSet;
        var scs = charsetsOf(sds, pcs);
        var study = addStudy(model, patient, {
          uid: str(sds, 'x0020000d'), date: str(sds, 'x00080020'), time: str(sds, 'x00080030'),
          description: text(sds, 'x00081030', scs), accession: text(sds, 'x00080050', scs),
          studyId: text(sds, 'x00200010', scs)
        });
        (studyRecord.kids || children(studyRecord)).forEach(function (seriesRecord) {
          if (!inUse(seriesRecord) || type(seriesRecord) !== 'SERIES') return;
          var rds = seriesRecord.dataSet;
          var series = addSeries(model, study, {
            uid: str(rds, 'x0020000e'), modality: str(rds, 'x00080060'),
            number: num(rds, 'x00200011'),
            description: text(rds, 'x0008103e', charsetsOf(rds, scs))
          });
          visitImages(series, seriesRecord.kids || children(seriesRecord));
        });
      });
    });
  }

  // Records in file order when their offsets lead nowhere: each record belongs to the
  // closest record of the level above it.
  function sequentialTree(items, type) {
    var levels = { PATIENT: 0, STUDY: 1, SERIES: 2 };
    var roots = [];
    var open = [];
    items.forEach(function (item) {
      var level = type(item) in levels ? levels[type(item)] : 3;
      item.kids = [];
      open.length = level;
      if (level === 0) roots.push(item);
      else if (open[level - 1]) open[level - 1].kids.push(item);
      if (level < 3) open[level] = item;
    });
    return roots;
  }

  // --- What an image is (PS3.3 C.7.6.3 Image Pixel, C.11.2 VOI LUT) ----------------------

  function imageInfo(dataSet) {
    var charsets = charsetsOf(dataSet);
    var pixel = dataSet.elements.x7fe00010;
    var rows = us(dataSet, 'x00280010', 0);
    var columns = us(dataSet, 'x00280011', 0);
    var bitsAllocated = us(dataSet, 'x00280100', 0);
    var spacing = nums(dataSet, 'x00280030');
    var ratio = nums(dataSet, 'x00280034');
    var aspect = 1;
    if (spacing.length === 2 && spacing[0] > 0 && spacing[1] > 0) aspect = spacing[0] / spacing[1];
    else if (ratio.length === 2 && ratio[0] > 0 && ratio[1] > 0) aspect = ratio[0] / ratio[1];
    return {
      sopClass: str(dataSet, 'x00080016'),
      transferSyntax: dataSet.syntax || '1.2.840.10008.1.2',
      hasPixels: !!pixel && rows > 0 && columns > 0,
      rows: rows,
      columns: columns,
      frames: Math.max(1, parseInt(str(dataSet, 'x00280008'), 10) || 1),
      samples: us(dataSet, 'x00280002', 1),
      photometric: str(dataSet, 'x00280004').toUpperCase() || 'MONOCHROME2',
      planar: us(dataSet, 'x00280006', 0),
      bitsAllocated: bitsAllocated,
      bitsStored: us(dataSet, 'x00280101', bitsAllocated),
      highBit: us(dataSet, 'x00280102', us(dataSet, 'x00280101', bitsAllocated) - 1),
      signed: us(dataSet, 'x00280103', 0) === 1,
      aspect: Math.min(10, Math.max(0.1, aspect)),
      inverse: str(dataSet, 'x20500020').toUpperCase() === 'INVERSE',
      instanceNumber: num(dataSet, 'x00200013'),
      location: num(dataSet, 'x00201041'),
      thickness: num(dataSet, 'x00180050'),
      modality: str(dataSet, 'x00080060'),
      seriesDescription: text(dataSet, 'x0008103e', charsets),
      patient: {
        name: text(dataSet, 'x00100010', charsets), id: text(dataSet, 'x00100020', charsets),
        birthDate: str(dataSet, 'x00100030'), sex: str(dataSet, 'x00100040')
      },
      study: {
        uid: str(dataSet, 'x0020000d'), date: str(dataSet, 'x00080020'),
        time: str(dataSet, 'x00080030'), description: text(dataSet, 'x00081030', charsets),
        accession: text(dataSet, 'x00080050', charsets), studyId: text(dataSet, 'x00200010', charsets)
      },
      series: { uid: str(dataSet, 'x0020000e'), number: num(dataSet, 'x00200011') }
    };
  }

  // Rescale and window of one frame: the Enhanced objects' functional groups (PS3.3
  // C.7.6.16) per frame, then shared, then the plain attributes.
  function frameValues(dataSet, frameIndex) {
    function fromGroups(sequenceTag, read) {
      var perFrame = dataSet.elements.x52009230;
      var shared = dataSet.elements.x52009229;
      var sources = [];
      if (perFrame && perFrame.items && perFrame.items[frameIndex]) sources.push(perFrame.items[frameIndex]);
      if (shared && shared.items && shared.items[0]) sources.push(shared.items[0]);
      for (var i = 0; i < sources.length; i++) {
        var group = sources[i].dataSet.elements[sequenceTag];
        if (group && group.items && group.items[0]) {
          var value = read(group.items[0].dataSet);
          if (value) return value;
        }
      }
      return read(dataSet);
    }
    var rescale = fromGroups('x00289145', function (ds) {
      var slope = num(ds, 'x00281053');
      var intercept = num(ds, 'x00281052');
      if (slope === null && intercept === null) return null;
      return { slope: slope === null || slope === 0 ? 1 : slope, intercept: intercept || 0 };
    }) || { slope: 1, intercept: 0 };
    var windows = fromGroups('x00289132', function (ds) {
      var centers = nums(ds, 'x00281050');
      var widths = nums(ds, 'x00281051');
      var names = str(ds, 'x00281055').split('\\');
      var found = [];
      for (var i = 0; i < Math.min(centers.length, widths.length); i++) {
        if (widths[i] > 0) found.push({ wc: centers[i], ww: widths[i], name: (names[i] || '').trim() });
      }
      return found.length ? found : null;
    }) || [];
    return { slope: rescale.slope, intercept: rescale.intercept, windows: windows };
  }

  // --- Pixel data ------------------------------------------------------------------------

  function unsupported(syntax) {
    return UserError(t('compressedUnsupported', { syntax: syntax }));
  }

  function syntaxName(uid) {
    return COMPRESSED[uid] ? COMPRESSED[uid][1] : uid;
  }

  // Stored values as read (unsigned, Bits Allocated wide) into values with Bits Stored
  // bits at High Bit, signed when Pixel Representation says so (PS3.5 8.1.1, PS3.3
  // C.7.6.3.1.1).
  function storedValues(raw, info) {
    var width = raw.BYTES_PER_ELEMENT * 8;
    var bits = Math.min(info.bitsStored || width, width);
    var shift = Math.max(0, Math.min(width - bits, info.highBit + 1 - bits));
    var signedType = { 1: Int8Array, 2: Int16Array, 4: Int32Array }[raw.BYTES_PER_ELEMENT];
    if (bits === width && shift === 0) {
      return info.signed ? new signedType(raw.buffer, raw.byteOffset, raw.length) : raw;
    }
    var out = info.signed ? new signedType(raw.length) : new raw.constructor(raw.length);
    var range = Math.pow(2, bits);
    var half = range / 2;
    var i;
    var v;
    if (width <= 16) {
      var mask = range - 1;
      for (i = 0; i < raw.length; i++) {
        v = (raw[i] >> shift) & mask;
        out[i] = info.signed && v >= half ? v - range : v;
      }
    } else {
      var divisor = Math.pow(2, shift);
      for (i = 0; i < raw.length; i++) {
        v = Math.floor(raw[i] / divisor) % range;
        out[i] = info.signed && v >= half ? v - range : v;
      }
    }
    return out;
  }

  function rawWords(bytes, bitsAllocated, bigEndian, count) {
    var size = bitsAllocated / 8;
    var buffer = new ArrayBuffer(count * size);
    new Uint8Array(buffer).set(bytes.subarray(0, count * size));
    if (bigEndian && size > 1) {
      var u8 = new Uint8Array(buffer);
      for (var i = 0; i < u8.length; i += size) {
        for (var a = i, b = i + size - 1; a < b; a++, b--) {
          var tmp = u8[a]; u8[a] = u8[b]; u8[b] = tmp;
        }
      }
    }
    if (size === 1) return new Uint8Array(buffer);
    if (size === 2) return new Uint16Array(buffer);
    return new Uint32Array(buffer);
  }

  function nativeFrame(dataSet, info, frameIndex) {
    var element = dataSet.elements.x7fe00010;
    var pixels = info.rows * info.columns;
    var samples = info.samples;
    var bytes = dataSet.byteArray;
    if (info.bitsAllocated === 1) {
      var bitsPerFrame = pixels * samples;
      var firstBit = frameIndex * bitsPerFrame;
      var bitValues = new Uint8Array(bitsPerFrame);
      for (var i = 0; i < bitsPerFrame; i++) {
        var bit = firstBit + i;
        bitValues[i] = (bytes[element.dataOffset + (bit >> 3)] >> (bit & 7)) & 1;
      }
      return grayFrame(bitValues, info);
    }
    if ([8, 16, 32].indexOf(info.bitsAllocated) < 0) {
      throw UserError(t('unreadable', { reason: 'Bits Allocated ' + info.bitsAllocated }));
    }
    var perPixel = info.photometric === 'YBR_FULL_422' ? 2 : samples;
    var frameBytes = pixels * perPixel * info.bitsAllocated / 8;
    var offset = element.dataOffset + frameIndex * frameBytes;
    if (offset + frameBytes > element.dataOffset + element.length + 1) {
      throw UserError(t('unreadable', { reason: 'the pixel data is shorter than the image' }));
    }
    var raw = rawWords(bytes.subarray(offset, offset + frameBytes), info.bitsAllocated,
      info.transferSyntax === BIG_ENDIAN, pixels * perPixel);
    if (samples === 1 && info.photometric !== 'PALETTE COLOR') return grayFrame(raw, info);
    if (info.photometric === 'PALETTE COLOR') return paletteFrame(raw, info, dataSet);
    return colorFrame(raw, info, info.planar === 1, info.photometric);
  }

  function grayFrame(raw, info) {
    var data = storedValues(raw, info);
    var min = Infinity;
    var max = -Infinity;
    for (var i = 0; i < data.length; i++) {
      var v = data[i];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    if (!data.length) { min = 0; max = 0; }
    return { color: false, width: info.columns, height: info.rows, data: data, min: min, max: max };
  }

  // RGB (or YCbCr) samples into 8-bit interleaved RGB (PS3.3 C.7.6.3.1.2).
  function colorFrame(raw, info, planar, photometric) {
    var pixels = info.rows * info.columns;
    var rgb = new Uint8Array(pixels * 3);
    var shift = Math.max(0, (info.bitsStored || 8) - 8);
    var scale = Math.pow(2, shift);
    function sample(i) { return shift ? Math.floor(raw[i] / scale) : raw[i]; }
    var i;
    if (photometric === 'YBR_FULL_422') {
      for (i = 0; i + 1 < pixels; i += 2) {
        var base = i * 2;
        var cb = sample(base + 2);
        var cr = sample(base + 3);
        ybrToRgb(sample(base), cb, cr, rgb, i * 3);
        ybrToRgb(sample(base + 1), cb, cr, rgb, i * 3 + 3);
      }
    } else {
      for (i = 0; i < pixels; i++) {
        var a = planar ? sample(i) : sample(i * 3);
        var b = planar ? sample(i + pixels) : sample(i * 3 + 1);
        var c = planar ? sample(i + 2 * pixels) : sample(i * 3 + 2);
        if (photometric === 'YBR_FULL') {
          ybrToRgb(a, b, c, rgb, i * 3);
        } else {
          rgb[i * 3] = a; rgb[i * 3 + 1] = b; rgb[i * 3 + 2] = c;
        }
      }
    }
    return { color: true, width: info.columns, height: info.rows, data: rgb, min: 0, max: 255 };
  }

  function ybrToRgb(y, cb, cr, out, at) {
    out[at] = clamp8(y + 1.402 * (cr - 128));
    out[at + 1] = clamp8(y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128));
    out[at + 2] = clamp8(y + 1.772 * (cb - 128));
  }

  function clamp8(v) { return v < 0 ? 0 : v > 255 ? 255 : Math.round(v); }

  // PS3.3 C.7.6.3.1.5: the palette's descriptor (entries, first mapped value, bits).
  function paletteFrame(raw, info, dataSet) {
    var luts = ['x00281201', 'x00281202', 'x00281203'].map(function (tag, n) {
      var descriptorTag = ['x00281101', 'x00281102', 'x00281103'][n];
      var element = dataSet.elements[descriptorTag];
      var entries = element ? dataSet.uint16(descriptorTag, 0) || 65536 : 0;
      var first = element ? dataSet.uint16(descriptorTag, 1) : 0;
      var bits = element ? dataSet.uint16(descriptorTag, 2) : 8;
      var data = dataSet.elements[tag];
      if (!data) throw UserError(t('unreadable', { reason: 'the colour palette is missing' }));
      var values = new Uint8Array(entries);
      for (var i = 0; i < entries; i++) {
        values[i] = bits > 8 ? dataSet.uint16(tag, i) >> 8 : dataSet.byteArray[data.dataOffset + i];
      }
      return { values: values, first: first, entries: entries };
    });
    var stored = storedValues(raw, info);
    var rgb = new Uint8Array(stored.length * 3);
    for (var p = 0; p < stored.length; p++) {
      for (var c = 0; c < 3; c++) {
        var lut = luts[c];
        var index = Math.min(lut.entries - 1, Math.max(0, stored[p] - lut.first));
        rgb[p * 3 + c] = lut.values[index];
      }
    }
    return { color: true, width: info.columns, height: info.rows, data: rgb, min: 0, max: 255 };
  }

  // PS3.5 A.4: a frame's compressed bytes. With an empty Basic Offset Table, one fragment
  // per frame, or frames that start where a fragment starts with a JPEG SOI (FFD8) or a
  // JPEG 2000 SOC (FF4F) marker.
  function encapsulatedFrame(dataSet, info, frameIndex) {
    var element = dataSet.elements.x7fe00010;
    var fragments = element.fragments || [];
    if (!fragments.length) throw UserError(t('unreadable', { reason: 'no compressed frames' }));
    if (element.basicOffsetTable && element.basicOffsetTable.length) {
      return dicomParser.readEncapsulatedImageFrame(dataSet, element, frameIndex);
    }
    if (info.frames === 1) {
      return dicomParser.readEncapsulatedPixelDataFromFragments(dataSet, element, 0, fragments.length);
    }
    if (fragments.length === info.frames) {
      return dicomParser.readEncapsulatedPixelDataFromFragments(dataSet, element, frameIndex, 1);
    }
    var starts = [];
    fragments.forEach(function (fragment, n) {
      var a = dataSet.byteArray[fragment.position];
      var b = dataSet.byteArray[fragment.position + 1];
      if (a === 0xff && (b === 0xd8 || b === 0x4f)) starts.push(n);
    });
    if (starts.length !== info.frames) throw UserError(t('unreadable', { reason: t('framesUnknown') }));
    var first = starts[frameIndex];
    var end = frameIndex + 1 < starts.length ? starts[frameIndex + 1] : fragments.length;
    return dicomParser.readEncapsulatedPixelDataFromFragments(dataSet, element, first, end - first);
  }

  // PS3.5 Annex G: a header of 16 unsigned longs (the number of segments, then their
  // offsets), then one PackBits segment per byte of each sample, most significant first.
  // The samples come out one plane after the other (G.2).
  function rleFrame(data, info, dataSet) {
    var view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    var count = view.getUint32(0, true);
    var bytesPerSample = info.bitsAllocated / 8;
    var pixels = info.rows * info.columns;
    if (count !== bytesPerSample * info.samples || count > 15) {
      throw UserError(t('unreadable', { reason: 'the RLE header does not match the image' }));
    }
    var segments = [];
    for (var s = 0; s < count; s++) {
      var start = view.getUint32(4 + 4 * s, true);
      var end = s + 1 < count ? view.getUint32(8 + 4 * s, true) : data.length;
      segments.push(unpackBits(data, start, end, pixels));
    }
    var total = pixels * info.samples;
    var raw = bytesPerSample === 1 ? new Uint8Array(total)
      : bytesPerSample === 2 ? new Uint16Array(total) : new Uint32Array(total);
    for (var sample = 0; sample < info.samples; sample++) {
      for (var p = 0; p < pixels; p++) {
        var v = 0;
        for (var b = 0; b < bytesPerSample; b++) v = v * 256 + segments[sample * bytesPerSample + b][p];
        raw[sample * pixels + p] = v;
      }
    }
    if (info.photometric === 'PALETTE COLOR') return paletteFrame(raw, info, dataSet);
    if (info.samples === 1) return grayFrame(raw, info);
    return colorFrame(raw, info, true, info.photometric);
  }

  function unpackBits(source, start, end, count) {
    var out = new Uint8Array(count);
    var o = 0;
    var i = start;
    while (i < end && o < count) {
      var n = source[i++];
      if (n < 128) {
        var literal = Math.min(n + 1, count - o);
        out.set(source.subarray(i, i + literal), o);
        o += n + 1;
        i += n + 1;
      } else if (n > 128) {
        var run = 257 - n;
        out.fill(source[i++], o, Math.min(count, o + run));
        o += run;
      }
    }
    return out;
  }

  // JPEG baseline (and 8-bit extended): the browser's own decoder, through an ImageBitmap
  // drawn on a canvas whose pixels are then read back.
  function browserJpegFrame(data, info) {
    var blob = new Blob([data], { type: 'image/jpeg' });
    return createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' })
      .then(function (bitmap) {
        var canvas = document.createElement('canvas');
        canvas.width = bitmap.width;
        canvas.height = bitmap.height;
        var context = canvas.getContext('2d', { willReadFrequently: true });
        context.drawImage(bitmap, 0, 0);
        bitmap.close();
        var rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        var pixels = canvas.width * canvas.height;
        var frameInfo = Object.assign({}, info, { rows: canvas.height, columns: canvas.width,
                                                  bitsStored: 8, highBit: 7, bitsAllocated: 8 });
        if (info.samples === 1) {
          var gray = new Uint8Array(pixels);
          for (var i = 0; i < pixels; i++) gray[i] = rgba[i * 4];
          return grayFrame(gray, Object.assign(frameInfo, { signed: false }));
        }
        var rgb = new Uint8Array(pixels * 3);
        for (var p = 0; p < pixels; p++) {
          rgb[p * 3] = rgba[p * 4]; rgb[p * 3 + 1] = rgba[p * 4 + 1]; rgb[p * 3 + 2] = rgba[p * 4 + 2];
        }
        return { color: true, width: canvas.width, height: canvas.height, data: rgb, min: 0, max: 255 };
      }, function () {
        throw unsupported(syntaxName(info.transferSyntax));
      });
  }

  function loadScript(src, global) {
    return new Promise(function (resolve, reject) {
      if (window[global]) return resolve(window[global]);
      var script = document.createElement('script');
      script.src = src;
      script.onload = function () {
        if (window[global]) resolve(window[global]);
        else reject(new Error(t('decoderMissing')));
      };
      script.onerror = function () { reject(new Error(t('decoderMissing'))); };
      document.head.appendChild(script);
    });
  }

  function base64Bytes(text) {
    var binary = atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  var codecPromises = {};
  function loadCodec(kind) {
    var spec = CODECS[kind];
    if (!codecPromises[kind]) {
      var quiet = function () {};
      codecPromises[kind] = loadScript(spec.src, spec.global).then(function (global) {
        if (!spec.wasm) return global;
        if (typeof WebAssembly === 'undefined' || !window[spec.wasm]) throw new Error('no WebAssembly');
        return global({ wasmBinary: base64Bytes(window[spec.wasm]), print: quiet, printErr: quiet });
      }).catch(function (error) {
        if (!spec.fallback) throw error;
        return loadScript(spec.fallback.src, spec.fallback.global).then(function (factory) {
          return factory({ print: quiet, printErr: quiet });
        });
      });
      codecPromises[kind].catch(function () { delete codecPromises[kind]; });
    }
    return codecPromises[kind];
  }

  // Decoded samples from a codec (8 or 16 bits, interleaved when in colour) into a frame.
  // The codec's sample precision is the number of stored bits, and the sign bit.
  function codecOutput(bytes, width, height, components, bitsPerSample, info, planar) {
    var pixels = width * height;
    var frameInfo = Object.assign({}, info, { rows: height, columns: width,
                                              bitsStored: bitsPerSample, highBit: bitsPerSample - 1 });
    var raw;
    if (bitsPerSample > 8) {
      raw = new Uint16Array(pixels * components);
      new Uint8Array(raw.buffer).set(bytes.subarray(0, raw.length * 2));
    } else {
      raw = new Uint8Array(bytes.subarray(0, pixels * components));
    }
    if (components === 1) return grayFrame(raw, frameInfo);
    var photometric = info.photometric === 'YBR_FULL' ? 'YBR_FULL' : 'RGB';
    return colorFrame(raw, frameInfo, planar, photometric);
  }

  function jpegLosslessFrame(data, info) {
    return loadCodec('jpeg-lossless').then(function (lib) {
      var decoder = new lib.Decoder();
      var out = decoder.decode(data.buffer, data.byteOffset, data.byteLength);
      var bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
      var components = decoder.numComp || info.samples;
      var precision = decoder.frame ? decoder.frame.precision : info.bitsStored;
      return codecOutput(bytes, decoder.xDim || info.columns, decoder.yDim || info.rows,
        components, precision, info, false);
    });
  }

  function jpegLsFrame(data, info) {
    return loadCodec('jpeg-ls').then(function (charls) {
      var decoder = new charls.JpegLSDecoder();
      try {
        decoder.getEncodedBuffer(data.length).set(data);
        decoder.decode();
        var frame = decoder.getFrameInfo();
        var interleave = decoder.getInterleaveMode();
        var bytes = new Uint8Array(decoder.getDecodedBuffer());
        return codecOutput(bytes, frame.width, frame.height, frame.componentCount,
          frame.bitsPerSample, info, frame.componentCount > 1 && interleave === 0);
      } finally {
        decoder.delete();
      }
    });
  }

  function j2kFrame(data, info) {
    return loadCodec('j2k').then(function (openjpeg) {
      var decoder = new openjpeg.J2KDecoder();
      try {
        decoder.getEncodedBuffer(data.length).set(data);
        decoder.decode();
        var frame = decoder.getFrameInfo();
        var bytes = new Uint8Array(decoder.getDecodedBuffer());
        var frameInfo = Object.assign({}, info);
        if (frame.isSigned !== undefined) frameInfo.signed = !!frame.isSigned;
        return codecOutput(bytes, frame.width, frame.height, frame.componentCount,
          frame.bitsPerSample, frameInfo, false);
      } finally {
        decoder.delete();
      }
    });
  }

  function decodeFrame(dataSet, info, frameIndex) {
    if (!info.hasPixels) {
      var what = NON_IMAGE_CLASSES[info.sopClass] ||
        Object.keys(NON_IMAGE_CLASSES).filter(function (uid) {
          return info.sopClass.indexOf(uid + '.') === 0;
        }).map(function (uid) { return NON_IMAGE_CLASSES[uid]; })[0] || t('noPixelData');
      return Promise.reject(UserError(t('notAnImage', { what: what })));
    }
    var syntax = info.transferSyntax;
    try {
      if (NATIVE[syntax]) return Promise.resolve(nativeFrame(dataSet, info, frameIndex));
      var kind = COMPRESSED[syntax] ? COMPRESSED[syntax][0] : null;
      if (!kind) return Promise.reject(unsupported(syntaxName(syntax)));
      if (kind === 'jpeg-extended' && info.bitsAllocated > 8) {
        return Promise.reject(unsupported(syntaxName(syntax)));
      }
      var data = encapsulatedFrame(dataSet, info, frameIndex);
      if (kind === 'rle') return Promise.resolve(rleFrame(data, info, dataSet));
      if (kind === 'jpeg' || kind === 'jpeg-extended') return browserJpegFrame(data, info);
      if (kind === 'jpeg-lossless') return jpegLosslessFrame(data, info);
      if (kind === 'jpeg-ls') return jpegLsFrame(data, info);
      return j2kFrame(data, info).catch(function (error) {
        if (error && error.forUser) throw error;
        throw unsupported(syntaxName(syntax));
      });
    } catch (error) {
      return Promise.reject(error);
    }
  }

  // --- Files and frames in memory --------------------------------------------------------

  var FILE_CACHE_SIZE = 3;
  var FRAME_CACHE_BYTES = 384 * 1024 * 1024;
  var openFiles = [];
  var frameCache = new Map();
  var frameCacheBytes = 0;

  function loadFile(image) {
    for (var i = 0; i < openFiles.length; i++) {
      if (openFiles[i].image === image) return openFiles[i].promise;
    }
    var promise = image.file.arrayBuffer().then(function (buffer) {
      return parseFile(new Uint8Array(buffer), false);
    });
    openFiles.unshift({ image: image, promise: promise });
    if (openFiles.length > FILE_CACHE_SIZE) openFiles.pop();
    promise.catch(function () {
      openFiles = openFiles.filter(function (entry) { return entry.promise !== promise; });
    });
    return promise;
  }

  function getFrame(item) {
    var key = item.image.key + ':' + item.frame;
    var cached = frameCache.get(key);
    if (cached) {
      frameCache.delete(key);
      frameCache.set(key, cached);
      return cached;
    }
    if (!item.image.file) return Promise.reject(UserError(t('fileMissing')));
    var promise = loadFile(item.image).then(function (dataSet) {
      var info = imageInfo(dataSet);
      item.image.info = info;
      return decodeFrame(dataSet, info, item.frame).then(function (frame) {
        var values = frameValues(dataSet, item.frame);
        frame.slope = values.slope;
        frame.intercept = values.intercept;
        frame.windows = values.windows;
        frame.info = info;
        frameCacheBytes += frame.data.byteLength;
        while (frameCacheBytes > FRAME_CACHE_BYTES && frameCache.size > 1) {
          var oldest = frameCache.keys().next().value;
          var old = frameCache.get(oldest);
          frameCache.delete(oldest);
          old.then(function (f) { frameCacheBytes -= f.data.byteLength; }, function () {});
        }
        return frame;
      });
    }, function (error) {
      throw UserError(t('unreadable', { reason: errorText(error) }));
    });
    frameCache.set(key, promise);
    promise.catch(function () { frameCache.delete(key); });
    return promise;
  }

  // --- Finding the images ----------------------------------------------------------------

  function findDicomdirs(index) {
    return index.entries.filter(function (entry) {
      return normalComponent(entry.path.split('/').pop()) === 'DICOMDIR';
    }).sort(function (a, b) { return a.path.length - b.path.length; });
  }

  var imageKeys = 0;

  function loadFolder(entries, progress) {
    var index = indexFiles(entries);
    var model = newModel();
    var dicomdirs = findDicomdirs(index);
    var chain = Promise.resolve();
    dicomdirs.forEach(function (entry) {
      chain = chain.then(function () {
        progress(t('readingIndex'));
        return entry.file.arrayBuffer().then(function (buffer) {
          return parseFile(new Uint8Array(buffer), false);
        }).then(function (dataSet) {
          var base = entry.path.split('/').slice(0, -1).join('/');
          readDicomdir(model, dataSet, index, base);
        }).catch(function (error) {
          model.notices.push(t('dicomdirUnreadable', { reason: errorText(error) }));
        });
      });
    });
    return chain.then(function () {
      var found = model.patients.some(function (p) {
        return p.studies.some(function (s) { return s.series.some(function (r) { return r.images.length; }); });
      });
      if (found) return model;
      model = Object.assign(newModel(), { notices: model.notices });
      return scanFiles(model, entries, progress);
    }).then(function (result) {
      result.patients.forEach(function (patient) {
        patient.studies.forEach(function (study) {
          study.series = study.series.filter(function (series) { return series.images.length; });
          study.series.forEach(function (series) {
            series.images.forEach(function (image) { image.key = 'i' + (imageKeys++); });
          });
        });
        patient.studies = patient.studies.filter(function (study) { return study.series.length; });
      });
      result.patients = result.patients.filter(function (patient) { return patient.studies.length; });
      sortModel(result);
      return result;
    });
  }

  // ``work`` for each item, at most ``limit`` at a time.
  function eachLimited(items, limit, work) {
    var queue = items.slice();
    function next() {
      if (!queue.length) return Promise.resolve();
      return Promise.resolve(work(queue.shift())).then(next);
    }
    var runners = [];
    for (var i = 0; i < Math.min(limit, items.length); i++) runners.push(next());
    return Promise.all(runners);
  }

  // No usable DICOMDIR: every file that starts as a DICOM Part 10 file is read.
  function scanFiles(model, entries, progress) {
    var done = 0;
    var order = 0;
    var files = entries.filter(function (entry) {
      return normalComponent(entry.path.split('/').pop()) !== 'DICOMDIR';
    });
    return eachLimited(files, 6, function (entry) {
      return readHeader(entry.file).then(function (dataSet) {
        if (!dataSet) return;
        var info = imageInfo(dataSet);
        if (!info.hasPixels) {
          model.skipped += 1;
          return;
        }
        var patient = addPatient(model, info.patient);
        var study = addStudy(model, patient, info.study);
        var series = addSeries(model, study, {
          uid: info.series.uid, number: info.series.number, modality: info.modality,
          description: info.seriesDescription
        });
        series.images.push({ file: entry.file, path: entry.path, instanceNumber: info.instanceNumber,
                             order: order++, info: info });
      }, function () {
        model.unreadable += 1;
      }).then(function () {
        done += 1;
        if (done % 25 === 0 || done === files.length) {
          progress(t('scanning', { done: done, total: files.length }));
        }
      });
    }).then(function () { return model; });
  }

  // A series' images, read up to their pixel data, become its stack of frames. A file
  // that cannot be read keeps its place and says so when shown.
  function scanSeries(series) {
    if (!series.scanning) {
      series.scanning = eachLimited(series.images, 6, function (image) {
        if (image.info || !image.file) return null;
        return readHeader(image.file).then(function (dataSet) {
          if (dataSet) image.info = imageInfo(dataSet);
        }, function () {});
      }).then(function () {
        var stack = [];
        series.images.forEach(function (image) {
          if (image.info && image.info.instanceNumber !== null && image.instanceNumber === null) {
            image.instanceNumber = image.info.instanceNumber;
          }
        });
        series.images.sort(function (a, b) {
          return (a.instanceNumber === null ? 1e9 : a.instanceNumber) -
            (b.instanceNumber === null ? 1e9 : b.instanceNumber) || a.order - b.order;
        });
        series.images.forEach(function (image) {
          var frames = image.info ? image.info.frames : 1;
          for (var f = 0; f < frames; f++) stack.push({ image: image, frame: f, frames: frames });
        });
        var first = series.images.filter(function (image) { return image.info; })[0];
        if (first) {
          if (!series.description) series.description = first.info.seriesDescription;
          if (!series.modality) series.modality = first.info.modality;
        }
        series.stack = stack;
        return series;
      });
    }
    return series.scanning;
  }

  // --- Display: windowing (PS3.3 C.11.2.1.2) ---------------------------------------------

  var CT_PRESETS = [
    { key: 'presetSoftTissue', ww: 400, wc: 40 },
    { key: 'presetLung', ww: 1500, wc: -600 },
    { key: 'presetBone', ww: 1800, wc: 400 },
    { key: 'presetBrain', ww: 80, wc: 40 }
  ];

  function modalityRange(frame) {
    var a = frame.min * frame.slope + frame.intercept;
    var b = frame.max * frame.slope + frame.intercept;
    return { low: Math.min(a, b), high: Math.max(a, b) };
  }

  function defaultWindow(frame) {
    if (frame.color) return { wc: 127.5, ww: 256 };
    if (frame.windows.length) return { wc: frame.windows[0].wc, ww: frame.windows[0].ww };
    var range = modalityRange(frame);
    return { wc: (range.low + range.high) / 2, ww: Math.max(1, range.high - range.low + 1) };
  }

  // PS3.3 C.11.2.1.2.1: the linear VOI function onto 0..255.
  function voi(x, wc, ww) {
    if (ww <= 1) return x < wc - 0.5 ? 0 : 255;
    var y = ((x - (wc - 0.5)) / (ww - 1) + 0.5) * 255;
    return y <= 0 ? 0 : y >= 255 ? 255 : y;
  }

  function renderFrame(frame, view, target) {
    var width = frame.width;
    var height = frame.height;
    if (target.width !== width || target.height !== height) {
      target.width = width;
      target.height = height;
    }
    var context = target.getContext('2d');
    var image = context.createImageData(width, height);
    var out = image.data;
    // MONOCHROME1 shows low values bright (PS3.3 C.7.6.3.1.2); a Presentation LUT Shape
    // of INVERSE asks the same of a MONOCHROME2 image, and is what MONOCHROME1 already
    // implies (C.8.11.6.1.2).
    var reversed = !frame.color && (frame.info.photometric === 'MONOCHROME1' || frame.info.inverse);
    var invert = view.invert !== reversed;
    var i;
    var v;
    if (frame.color) {
      var lut = new Uint8ClampedArray(256);
      for (i = 0; i < 256; i++) {
        v = voi(i, view.wc, view.ww);
        lut[i] = invert ? 255 - v : v;
      }
      for (i = 0; i < width * height; i++) {
        out[i * 4] = lut[frame.data[i * 3]];
        out[i * 4 + 1] = lut[frame.data[i * 3 + 1]];
        out[i * 4 + 2] = lut[frame.data[i * 3 + 2]];
        out[i * 4 + 3] = 255;
      }
    } else {
      var data = frame.data;
      var min = frame.min;
      var span = frame.max - frame.min + 1;
      var table = null;
      if (span <= 1 << 20) {
        table = new Uint8ClampedArray(span);
        for (i = 0; i < span; i++) {
          v = voi((min + i) * frame.slope + frame.intercept, view.wc, view.ww);
          table[i] = invert ? 255 - v : v;
        }
      }
      for (i = 0; i < width * height; i++) {
        if (table) {
          v = table[data[i] - min];
        } else {
          v = voi(data[i] * frame.slope + frame.intercept, view.wc, view.ww);
          if (invert) v = 255 - v;
        }
        out[i * 4] = out[i * 4 + 1] = out[i * 4 + 2] = v;
        out[i * 4 + 3] = 255;
      }
    }
    context.putImageData(image, 0, 0);
  }

  // --- The page --------------------------------------------------------------------------

  var $ = function (id) { return document.getElementById(id); };
  var els = {};
  var app = {
    model: null,
    seriesList: [],
    series: null,
    index: 0,
    frame: null,
    item: null,
    tool: 'wl',
    view: { wc: 0, ww: 1, invert: false, zoom: 1, panX: 0, panY: 0 },
    windowChosen: false,
    presetKey: null,
    token: 0
  };
  var offscreen = document.createElement('canvas');

  function applyTexts() {
    document.title = TEXT.appName;
    document.querySelectorAll('[data-text]').forEach(function (el) {
      el.textContent = TEXT[el.getAttribute('data-text')];
    });
    document.querySelectorAll('[data-label]').forEach(function (el) {
      el.setAttribute('aria-label', TEXT[el.getAttribute('data-label')]);
      if (el.tagName === 'BUTTON' && !el.title) el.title = TEXT[el.getAttribute('data-label')];
    });
    $('start-lead').textContent = TEXT.startLead;
    var list = $('help-list');
    TEXT.help.forEach(function (line) {
      var li = document.createElement('li');
      li.textContent = line;
      list.appendChild(li);
    });
    describeFolder();
  }

  // The folder to choose, named from where this page sits: <folder>/IHE_PDI/index.html.
  function describeFolder() {
    var step = $('step-choose');
    var parts = [];
    try {
      parts = decodeURIComponent(location.pathname).split('/').filter(Boolean);
    } catch (badEscape) { parts = []; }
    var folder = null;
    if (parts.length >= 2 && parts[parts.length - 2].toUpperCase() === 'IHE_PDI') {
      folder = parts.length >= 3 ? parts[parts.length - 3] : '';
    }
    step.textContent = '';
    if (folder === null) {
      step.textContent = TEXT.stepChoose;
      return;
    }
    var disc = /^[A-Za-z]:$/.test(folder) || folder === '';
    var template = disc ? TEXT.stepChooseDisc : TEXT.stepChooseNamed;
    var pieces = template.split('{folder}');
    step.appendChild(document.createTextNode(pieces[0]));
    var strong = document.createElement('strong');
    strong.id = 'folder-name';
    strong.textContent = folder || '/';
    step.appendChild(strong);
    step.appendChild(document.createTextNode(pieces[1] || ''));
  }

  function setStatus(message, isError) {
    els.status.textContent = message || '';
    els.status.classList.toggle('error', !!isError);
  }

  function formatDate(da) {
    var m = /^(\d{4})(\d{2})(\d{2})/.exec(da || '');
    return m ? m[1] + '-' + m[2] + '-' + m[3] : (da || '');
  }

  function formatTime(tm) {
    var m = /^(\d{2})(\d{2})/.exec(tm || '');
    return m ? m[1] + ':' + m[2] : '';
  }

  // PS3.5 6.2 PN: up to three groups (alphabetic, ideographic, phonetic) of five
  // components (family, given, middle, prefix, suffix).
  function formatName(pn) {
    if (!pn) return TEXT.unnamedPatient;
    var groups = pn.split('=').map(function (group) {
      return group.split('^').map(function (c) { return c.trim(); });
    });
    function western(c) {
      var given = [c[3], c[1], c[2]].filter(Boolean).join(' ');
      var name = [c[0], given].filter(Boolean).join(', ');
      return c[4] ? name + ' ' + c[4] : name;
    }
    function eastern(c) { return [c[0], c[1], c[2]].filter(Boolean).join(' '); }
    var main = groups[0] ? western(groups[0]) : '';
    var others = groups.slice(1).map(eastern).filter(Boolean);
    if (!main) return others.join(' · ') || TEXT.unnamedPatient;
    return others.length ? main + ' (' + others.join(' · ') + ')' : main;
  }

  function formatNumber(n) {
    if (Math.abs(n) >= 100) return String(Math.round(n));
    return String(Math.round(n * 100) / 100);
  }

  function showPatient(patient) {
    var bar = els.patient;
    bar.textContent = '';
    if (!patient) return;
    var name = document.createElement('span');
    name.className = 'name';
    name.textContent = formatName(patient.name);
    bar.appendChild(name);
    var meta = [];
    if (patient.id) meta.push(t('patientId', { id: patient.id }));
    if (patient.birthDate) meta.push(t('born', { date: formatDate(patient.birthDate) }));
    if (TEXT.sexLabel[patient.sex]) meta.push(TEXT.sexLabel[patient.sex]);
    if (meta.length) {
      var span = document.createElement('span');
      span.className = 'meta';
      span.textContent = meta.join(' · ');
      bar.appendChild(span);
    }
  }

  function element(tag, className, textContent) {
    var el = document.createElement(tag);
    if (className) el.className = className;
    if (textContent !== undefined) el.textContent = textContent;
    return el;
  }

  function seriesTitle(series) {
    return series.description || t('seriesUntitled', { number: series.number === null ? '' : series.number });
  }

  function seriesMeta(series) {
    var parts = [];
    if (series.modality) parts.push(series.modality);
    if (series.number !== null && series.description) parts.push(t('seriesLabel', { number: series.number }));
    parts.push(plural('imageCount', series.images.length));
    if (series.stack && series.stack.length > series.images.length) {
      parts.push(plural('frameCount', series.stack.length));
    }
    return parts.join(' · ');
  }

  function studyModalities(study) {
    var modalities = [];
    study.series.forEach(function (series) {
      if (series.modality && modalities.indexOf(series.modality) < 0) modalities.push(series.modality);
    });
    return modalities.join(', ');
  }

  function studyTitle(study) {
    return study.description || studyModalities(study) || TEXT.noDescription;
  }

  function buildSeriesPanel(model) {
    var panel = els.panel;
    panel.textContent = '';
    app.seriesList = [];
    var many = model.patients.length > 1;
    model.patients.forEach(function (patient) {
      var group = element('section', 'patient-group');
      if (many) group.appendChild(element('h2', 'patient-heading', formatName(patient.name)));
      patient.studies.forEach(function (study) {
        var block = element('section', 'study');
        var modalities = studyModalities(study);
        var title = element(many ? 'h3' : 'h2', 'study-title',
          (formatDate(study.date) || TEXT.noDate) + ' · ' + studyTitle(study));
        block.appendChild(title);
        var values = { modalities: modalities, series: plural('seriesCount', study.series.length),
                       accession: study.accession };
        block.appendChild(element('p', 'study-meta',
          t(study.accession ? 'studyMeta' : 'studyMetaNoAccession', values)));
        var list = element('ul', 'series-list');
        study.series.forEach(function (series) {
          var li = element('li');
          var button = element('button', 'series');
          button.type = 'button';
          series.button = button;
          series.thumb = element('canvas', 'thumb');
          series.thumb.width = 64;
          series.thumb.height = 64;
          series.thumb.setAttribute('aria-hidden', 'true');
          var textBox = element('span', 'series-text');
          series.titleEl = element('span', 'series-title', seriesTitle(series));
          series.metaEl = element('span', 'series-meta', seriesMeta(series));
          textBox.appendChild(series.titleEl);
          textBox.appendChild(series.metaEl);
          button.appendChild(series.thumb);
          button.appendChild(textBox);
          button.addEventListener('click', function () { openSeries(series); });
          li.appendChild(button);
          list.appendChild(li);
          app.seriesList.push(series);
        });
        block.appendChild(list);
        group.appendChild(block);
      });
      panel.appendChild(group);
    });
    var notices = model.notices.slice();
    if (model.missing) notices.push(t('missingFiles', { count: model.missing }));
    if (model.skipped) notices.push(t('skippedFiles', { count: model.skipped }));
    if (model.unreadable) notices.push(t('unreadableFiles', { count: model.unreadable }));
    notices.forEach(function (notice) { panel.appendChild(element('p', 'notice', notice)); });
  }

  function refreshSeriesLabels(series) {
    if (series.titleEl) series.titleEl.textContent = seriesTitle(series);
    if (series.metaEl) series.metaEl.textContent = seriesMeta(series);
  }

  function openSeries(series) {
    app.series = series;
    app.windowChosen = false;
    app.presetKey = null;
    app.view.zoom = 1;
    app.view.panX = 0;
    app.view.panY = 0;
    app.view.invert = false;
    app.frame = null;
    app.presets = null;
    els.presets.textContent = '';
    app.seriesList.forEach(function (other) {
      if (other.button) other.button.setAttribute('aria-current', other === series ? 'true' : 'false');
    });
    showPatient(series.study.patient);
    showMessage(TEXT.loadingImage, true);
    app.token++;
    els.viewport.setAttribute('data-status', 'loading');
    els.viewport.removeAttribute('data-index');
    return scanSeries(series).then(function () {
      if (app.series !== series) return;
      refreshSeriesLabels(series);
      els.slider.max = String(Math.max(1, series.stack.length));
      return show(0);
    });
  }

  function showMessage(message, loading) {
    els.message.textContent = message || '';
    els.message.hidden = !message;
    els.message.classList.toggle('loading', !!loading);
  }

  function show(index) {
    var series = app.series;
    if (!series || !series.stack || !series.stack.length) return Promise.resolve();
    index = Math.max(0, Math.min(series.stack.length - 1, index));
    app.index = index;
    var item = series.stack[index];
    app.item = item;
    els.slider.value = String(index + 1);
    updateSliceLabel();
    var token = ++app.token;
    els.viewport.setAttribute('data-status', 'loading');
    var slow = setTimeout(function () {
      if (token === app.token) showMessage(TEXT.loadingImage, true);
    }, 150);
    return getFrame(item).then(function (frame) {
      if (token !== app.token) return;
      clearTimeout(slow);
      app.frame = frame;
      if (!app.windowChosen) {
        var w = defaultWindow(frame);
        app.view.wc = w.wc;
        app.view.ww = w.ww;
        app.presetKey = 'default';
        buildPresets(frame);
      }
      showMessage('');
      renderFrame(frame, app.view, offscreen);
      draw();
      els.viewport.setAttribute('data-status', 'shown');
      els.viewport.setAttribute('data-index', String(index + 1));
      prefetch(series, index);
      if (series.thumb && !series.thumbDone) thumbnail(series, frame);
    }, function (error) {
      if (token !== app.token) return;
      clearTimeout(slow);
      app.frame = null;
      draw();
      showMessage(error && error.forUser ? error.message : t('unreadable', { reason: errorText(error) }));
      if (series.thumb && !series.thumbDone) thumbnailFailed(series);
      els.viewport.setAttribute('data-status', 'message');
      els.viewport.setAttribute('data-index', String(index + 1));
      updateOverlay();
    });
  }

  function prefetch(series, index) {
    [index + 1, index + 2, index - 1].forEach(function (n) {
      if (n >= 0 && n < series.stack.length) getFrame(series.stack[n]).catch(function () {});
    });
  }

  function updateSliceLabel() {
    var series = app.series;
    var total = series && series.stack ? series.stack.length : 0;
    els.sliceLabel.textContent = total ? t('sliceOf', { index: app.index + 1, total: total }) : '';
    els.slider.setAttribute('aria-valuetext', els.sliceLabel.textContent);
  }

  function draw() {
    var canvas = els.canvas;
    var ratio = window.devicePixelRatio || 1;
    var width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    var height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    var context = canvas.getContext('2d', { willReadFrequently: true });
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = '#000';
    context.fillRect(0, 0, width, height);
    var frame = app.frame;
    if (frame) {
      var aspect = frame.info ? frame.info.aspect : 1;
      var fit = Math.min(width / frame.width, height / (frame.height * aspect));
      var scale = fit * app.view.zoom;
      var w = frame.width * scale;
      var h = frame.height * aspect * scale;
      var x = width / 2 + app.view.panX * ratio - w / 2;
      var y = height / 2 + app.view.panY * ratio - h / 2;
      context.imageSmoothingEnabled = scale < 3;
      context.drawImage(offscreen, x, y, w, h);
    }
    updateOverlay();
  }

  function updateOverlay() {
    var series = app.series;
    var item = app.item;
    if (!series || !item) return;
    var study = series.study;
    var patient = study.patient;
    var info = item.image.info;
    var total = series.stack.length;
    var tl = [formatName(patient.name)];
    if (patient.id) tl.push(t('patientId', { id: patient.id }));
    if (patient.birthDate) tl.push(t('born', { date: formatDate(patient.birthDate) }));
    var tr = [studyTitle(study),
              [formatDate(study.date), formatTime(study.time)].filter(Boolean).join(' '),
              [series.modality, seriesTitle(series)].filter(Boolean).join(' · ')];
    var bl = [t('sliceOf', { index: app.index + 1, total: total })];
    if (item.frames > 1) bl.push(t('frameOf', { frame: item.frame + 1, frames: item.frames }));
    if (info && info.location !== null && item.frames === 1) {
      bl.push(t('locationShort', { loc: formatNumber(info.location) }));
    }
    if (info && info.thickness) bl.push(t('thicknessShort', { thick: formatNumber(info.thickness) }));
    var br = [];
    if (app.frame) {
      br.push(t('windowShort', { ww: formatNumber(app.view.ww), wc: formatNumber(app.view.wc) }));
      br.push(t('zoomShort', { zoom: Math.round(app.view.zoom * 100) }));
    }
    $('corner-tl').textContent = tl.join('\n');
    $('corner-tr').textContent = tr.filter(Boolean).join('\n');
    $('corner-bl').textContent = bl.join('\n');
    $('corner-br').textContent = br.join('\n');
    els.canvas.setAttribute('aria-label', t('imageAlt', {
      modality: series.modality || '', index: app.index + 1, total: total, series: seriesTitle(series),
      ww: formatNumber(app.view.ww), wc: formatNumber(app.view.wc)
    }));
    els.viewport.setAttribute('data-wc', formatNumber(app.view.wc));
    els.viewport.setAttribute('data-ww', formatNumber(app.view.ww));
  }

  var paintPending = false;
  function repaint() {
    if (paintPending) return;
    paintPending = true;
    requestAnimationFrame(function () {
      paintPending = false;
      if (app.frame) renderFrame(app.frame, app.view, offscreen);
      draw();
    });
  }

  // --- Presets ---------------------------------------------------------------------------

  function presetsFor(frame) {
    var presets = [];
    var w = defaultWindow(frame);
    presets.push({ key: 'default', label: TEXT.presetDefault, wc: w.wc, ww: w.ww });
    if (!frame.color) {
      frame.windows.slice(1).forEach(function (extra, n) {
        presets.push({ key: 'file' + (n + 1), label: titleCase(extra.name) || (TEXT.presetDefault + ' ' + (n + 2)),
                       wc: extra.wc, ww: extra.ww });
      });
      var range = modalityRange(frame);
      presets.push({ key: 'full', label: TEXT.presetFull, wc: (range.low + range.high) / 2,
                     ww: Math.max(1, range.high - range.low + 1) });
      if (app.series && app.series.modality === 'CT') {
        CT_PRESETS.forEach(function (preset) {
          var known = presets.some(function (other) {
            return other.wc === preset.wc && other.ww === preset.ww;
          });
          if (!known) presets.push({ key: preset.key, label: TEXT[preset.key], wc: preset.wc, ww: preset.ww });
        });
      }
    }
    return presets;
  }

  function titleCase(text) {
    return (text || '').toLowerCase().replace(/(^|\s)\S/g, function (c) { return c.toUpperCase(); });
  }

  function buildPresets(frame) {
    var holder = els.presets;
    holder.textContent = '';
    app.presets = presetsFor(frame);
    app.presets.forEach(function (preset, n) {
      var button = element('button', 'button preset', preset.label);
      button.type = 'button';
      button.setAttribute('data-preset', preset.key);
      button.title = t('presetTitle', { ww: formatNumber(preset.ww), wc: formatNumber(preset.wc), key: n + 1 });
      button.setAttribute('aria-pressed', preset.key === app.presetKey ? 'true' : 'false');
      button.addEventListener('click', function () { applyPreset(preset); });
      holder.appendChild(button);
    });
  }

  function applyPreset(preset) {
    if (!preset || !app.frame) return;
    app.view.wc = preset.wc;
    app.view.ww = preset.ww;
    app.windowChosen = true;
    markPreset(preset.key);
    repaint();
  }

  function markPreset(key) {
    app.presetKey = key;
    els.presets.querySelectorAll('.preset').forEach(function (button) {
      button.setAttribute('aria-pressed', button.getAttribute('data-preset') === key ? 'true' : 'false');
    });
  }

  // --- Thumbnails ------------------------------------------------------------------------

  var thumbCanvas = document.createElement('canvas');

  function thumbnail(series, frame) {
    series.thumbDone = true;
    var w = defaultWindow(frame);
    renderFrame(frame, { wc: w.wc, ww: w.ww, invert: false }, thumbCanvas);
    var context = series.thumb.getContext('2d');
    context.fillStyle = '#000';
    context.fillRect(0, 0, 64, 64);
    var aspect = frame.info ? frame.info.aspect : 1;
    var scale = Math.min(64 / frame.width, 64 / (frame.height * aspect));
    var dw = frame.width * scale;
    var dh = frame.height * aspect * scale;
    context.drawImage(thumbCanvas, (64 - dw) / 2, (64 - dh) / 2, dw, dh);
  }

  // A thumbnail for a series whose image cannot be shown: its modality, greyed.
  function thumbnailFailed(series) {
    series.thumbDone = true;
    var context = series.thumb.getContext('2d');
    context.fillStyle = '#000';
    context.fillRect(0, 0, 64, 64);
    context.fillStyle = '#a8b3bf';
    context.font = '600 15px system-ui, sans-serif';
    context.textAlign = 'center';
    context.textBaseline = 'middle';
    context.fillText(series.modality || '?', 32, 32);
  }

  function thumbnailsInBackground() {
    var pending = app.seriesList.slice();
    var model = app.model;
    (function next() {
      var series = app.model === model ? pending.shift() : null;
      if (!series) {
        els.panel.setAttribute('data-thumbnails', 'done');
        return;
      }
      if (series.thumbDone) return next();
      scanSeries(series).then(function () {
        refreshSeriesLabels(series);
        if (!series.stack.length) return null;
        return getFrame(series.stack[Math.floor(series.stack.length / 2)]).then(function (frame) {
          if (!series.thumbDone) thumbnail(series, frame);
        });
      }).catch(function () {
        thumbnailFailed(series);
      }).then(function () { setTimeout(next, 0); });
    })();
  }

  // --- Interaction -----------------------------------------------------------------------

  function step(delta) {
    if (!app.series || !app.series.stack) return;
    var target = Math.max(0, Math.min(app.series.stack.length - 1, app.index + delta));
    if (target !== app.index) show(target);
  }

  function zoomBy(factor, atX, atY) {
    var view = app.view;
    var zoom = Math.max(0.1, Math.min(40, view.zoom * factor));
    factor = zoom / view.zoom;
    if (atX !== undefined) {
      // Keep the point under the cursor where it is.
      view.panX = atX - (atX - view.panX) * factor;
      view.panY = atY - (atY - view.panY) * factor;
    } else {
      view.panX *= factor;
      view.panY *= factor;
    }
    view.zoom = zoom;
    draw();
  }

  function resetView() {
    app.view.zoom = 1;
    app.view.panX = 0;
    app.view.panY = 0;
    app.view.invert = false;
    els.invert.setAttribute('aria-pressed', 'false');
    if (app.presets) applyPreset(app.presets[0]);
    app.windowChosen = false;
    repaint();
  }

  function setTool(tool) {
    app.tool = tool;
    document.querySelectorAll('.tool').forEach(function (button) {
      button.setAttribute('aria-pressed', button.getAttribute('data-tool') === tool ? 'true' : 'false');
    });
  }

  function windowBy(dx, dy) {
    if (!app.frame) return;
    var range = app.frame.color ? { low: 0, high: 255 } : modalityRange(app.frame);
    var sensitivity = Math.max((range.high - range.low) / 600, 0.05);
    app.view.ww = Math.max(1, app.view.ww + dx * sensitivity);
    app.view.wc = app.view.wc + dy * sensitivity;
    app.windowChosen = true;
    markPreset(null);
    repaint();
  }

  function relativeToCentre(event) {
    var rect = els.viewport.getBoundingClientRect();
    return { x: event.clientX - rect.left - rect.width / 2, y: event.clientY - rect.top - rect.height / 2 };
  }

  function bindPointer() {
    var viewport = els.viewport;
    var pointers = new Map();
    var mode = null;
    var pinch = null;

    function pinchState() {
      var points = Array.from(pointers.values());
      var dx = points[0].x - points[1].x;
      var dy = points[0].y - points[1].y;
      return { distance: Math.max(1, Math.sqrt(dx * dx + dy * dy)),
               x: (points[0].x + points[1].x) / 2, y: (points[0].y + points[1].y) / 2 };
    }

    viewport.addEventListener('pointerdown', function (event) {
      viewport.focus({ preventScroll: true });
      viewport.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (pointers.size === 2) {
        mode = 'pinch';
        pinch = pinchState();
      } else if (pointers.size === 1) {
        if (event.button === 1 || event.button === 2 || event.shiftKey) mode = 'pan';
        else if (event.ctrlKey || event.metaKey) mode = 'zoom';
        else mode = app.tool;
      }
      event.preventDefault();
    });
    viewport.addEventListener('pointermove', function (event) {
      var last = pointers.get(event.pointerId);
      if (!last) return;
      var dx = event.clientX - last.x;
      var dy = event.clientY - last.y;
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (mode === 'pinch' && pointers.size === 2) {
        var now = pinchState();
        app.view.panX += now.x - pinch.x;
        app.view.panY += now.y - pinch.y;
        var rect = viewport.getBoundingClientRect();
        zoomBy(now.distance / pinch.distance, now.x - rect.left - rect.width / 2,
               now.y - rect.top - rect.height / 2);
        pinch = now;
      } else if (mode === 'wl') {
        windowBy(dx, dy);
      } else if (mode === 'pan') {
        app.view.panX += dx;
        app.view.panY += dy;
        draw();
      } else if (mode === 'zoom') {
        zoomBy(Math.exp(-dy * 0.01));
      }
    });
    function release(event) {
      pointers.delete(event.pointerId);
      if (pointers.size === 0) mode = null;
      else if (pointers.size === 1) mode = null;
    }
    viewport.addEventListener('pointerup', release);
    viewport.addEventListener('pointercancel', release);
    viewport.addEventListener('contextmenu', function (event) { event.preventDefault(); });

    var wheelRest = 0;
    viewport.addEventListener('wheel', function (event) {
      event.preventDefault();
      var delta = event.deltaY * (event.deltaMode === 1 ? 40 : event.deltaMode === 2 ? 800 : 1);
      if (event.ctrlKey || event.metaKey) {
        var at = relativeToCentre(event);
        zoomBy(Math.exp(-delta * 0.002), at.x, at.y);
        return;
      }
      // One image per notch of a mouse wheel; a touchpad's small steps add up.
      wheelRest += delta;
      if (Math.abs(wheelRest) >= 40) {
        step(wheelRest > 0 ? 1 : -1);
        wheelRest = 0;
      }
    }, { passive: false });
  }

  function bindKeys() {
    document.addEventListener('keydown', function (event) {
      if (els.viewer.hidden || event.altKey) return;
      var target = event.target;
      var inSlider = target === els.slider;
      if (!inSlider && target.closest && target.closest('input, textarea, select')) return;
      var key = event.key;
      var handled = true;
      if (!inSlider && (key === 'ArrowDown' || key === 'ArrowRight')) step(1);
      else if (!inSlider && (key === 'ArrowUp' || key === 'ArrowLeft')) step(-1);
      else if (!inSlider && key === 'PageDown') step(10);
      else if (!inSlider && key === 'PageUp') step(-10);
      else if (!inSlider && key === 'Home') step(-1e9);
      else if (!inSlider && key === 'End') step(1e9);
      else if (event.ctrlKey || event.metaKey) handled = false;
      else if (key === '+' || key === '=') zoomBy(1.25);
      else if (key === '-' || key === '_') zoomBy(0.8);
      else if (key === '0' || key === 'r' || key === 'R') resetView();
      else if (key === 'i' || key === 'I') toggleInvert();
      else if (/^[1-9]$/.test(key) && app.presets && app.presets[Number(key) - 1]) {
        applyPreset(app.presets[Number(key) - 1]);
      } else handled = false;
      if (handled) event.preventDefault();
    });
  }

  function toggleInvert() {
    app.view.invert = !app.view.invert;
    els.invert.setAttribute('aria-pressed', app.view.invert ? 'true' : 'false');
    repaint();
  }

  // --- Start -----------------------------------------------------------------------------

  function openEntries(entries) {
    if (!entries.length) {
      setStatus(TEXT.emptyFolder, true);
      return Promise.resolve();
    }
    document.body.setAttribute('data-state', 'loading');
    setStatus(t('readingFiles', { count: entries.length }));
    frameCache.clear();
    frameCacheBytes = 0;
    openFiles = [];
    return loadFolder(entries, function (message) { setStatus(message); }).then(function (model) {
      if (!model.patients.length) {
        document.body.setAttribute('data-state', 'start');
        setStatus(model.notices.concat([TEXT.noImages]).join(' '), true);
        return;
      }
      app.model = model;
      els.start.hidden = true;
      els.viewer.hidden = false;
      els.again.hidden = false;
      document.body.setAttribute('data-state', 'viewing');
      setStatus('');
      buildSeriesPanel(model);
      var first = app.seriesList[0];
      return openSeries(first).then(function () {
        els.viewport.focus({ preventScroll: true });
        thumbnailsInBackground();
      });
    }).catch(function (error) {
      document.body.setAttribute('data-state', 'start');
      setStatus(t('unreadable', { reason: errorText(error) }), true);
    });
  }

  function showStart() {
    els.viewer.hidden = true;
    els.start.hidden = false;
    els.again.hidden = true;
    els.patient.textContent = '';
    document.body.setAttribute('data-state', 'start');
    app.series = null;
    app.frame = null;
    els.choose.focus();
  }

  function bindStart() {
    els.choose.addEventListener('click', function () { els.folderInput.click(); });
    $('choose-files').addEventListener('click', function () { els.filesInput.click(); });
    els.again.addEventListener('click', showStart);
    [els.folderInput, els.filesInput].forEach(function (input) {
      input.addEventListener('change', function () {
        var entries = entriesFromInput(input.files || []);
        input.value = '';
        openEntries(entries);
      });
    });
    var dropTargets = [els.drop, document.body];
    dropTargets.forEach(function (target) {
      target.addEventListener('dragover', function (event) {
        event.preventDefault();
        els.drop.classList.add('over');
      });
      target.addEventListener('dragleave', function () { els.drop.classList.remove('over'); });
      target.addEventListener('drop', function (event) {
        event.preventDefault();
        event.stopPropagation();
        els.drop.classList.remove('over');
        if (!els.viewer.hidden) showStart();
        entriesFromDrop(event.dataTransfer).then(openEntries);
      });
    });
  }

  function bindViewer() {
    document.querySelectorAll('.tool').forEach(function (button) {
      button.addEventListener('click', function () { setTool(button.getAttribute('data-tool')); });
    });
    els.invert.addEventListener('click', toggleInvert);
    $('zoom-in').addEventListener('click', function () { zoomBy(1.25); });
    $('zoom-out').addEventListener('click', function () { zoomBy(0.8); });
    $('reset').addEventListener('click', resetView);
    $('prev').addEventListener('click', function () { step(-1); });
    $('next').addEventListener('click', function () { step(1); });
    els.slider.addEventListener('input', function () { show(Number(els.slider.value) - 1); });
    bindPointer();
    bindKeys();
    if (window.ResizeObserver) new ResizeObserver(function () { draw(); }).observe(els.viewport);
    else window.addEventListener('resize', draw);
  }

  function init() {
    els = {
      status: $('status'), start: $('start'), viewer: $('viewer'), again: $('choose-again'),
      patient: $('patient'), panel: $('series-panel'), viewport: $('viewport'), canvas: $('image'),
      message: $('image-message'), slider: $('slice'), sliceLabel: $('slice-label'),
      presets: $('presets'), invert: $('invert'), choose: $('choose'), drop: $('drop'),
      folderInput: $('folder-input'), filesInput: $('files-input')
    };
    applyTexts();
    if (typeof dicomParser === 'undefined' || typeof TextDecoder === 'undefined' ||
        typeof createImageBitmap === 'undefined' || !window.Map || !Blob.prototype.arrayBuffer) {
      setStatus(TEXT.oldBrowser, true);
      els.choose.disabled = true;
      return;
    }
    bindStart();
    bindViewer();
  }

  init();
})();
