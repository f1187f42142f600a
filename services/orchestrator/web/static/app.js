// The Magic3D page: submit a job, watch its events (server-sent events from WatchJob), list jobs, orbit the GLB.
// Plain ES modules, no build step; three.js is vendored under /static/vendor/three (scripts/vendor_three.sh).
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/addons/controls/OrbitControls.js';

const $ = (id) => document.getElementById(id);
const BACKGROUND = 0x20232a;  // the viewer's clear colour (the browser test counts pixels that differ from it)
let watching = null;  // { id, source }

// -- API ---------------------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: 'same-origin', ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    const where = error.field ? `${error.field}: ` : '';
    throw new Error(`${response.status} ${where}${error.message || response.statusText}`);
  }
  return body;
}

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(',', 2)[1] || '');
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// -- submit and list ---------------------------------------------------------------------------------------------

async function loadPresets() {
  const { presets } = await api('/api/presets');
  const select = $('preset');
  for (const preset of presets) {
    const option = document.createElement('option');
    option.value = preset.name;
    option.textContent = preset.image ? `${preset.name} (image)` : preset.name;
    select.appendChild(option);
  }
}

async function submit(event) {
  event.preventDefault();
  $('submit-error').textContent = '';
  const body = { prompt: $('prompt').value, preset: $('preset').value, seed: Number($('seed').value || 0) };
  const file = $('image').files[0];
  if (file) body.image_base64 = await readAsBase64(file);
  $('submit').disabled = true;
  try {
    const job = await api('/api/jobs', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    watch(job.id);
    refreshJobs();
  } catch (error) {
    $('submit-error').textContent = error.message;
  } finally {
    $('submit').disabled = false;
  }
}

async function refreshJobs() {
  let jobs;
  try {
    ({ jobs } = await api('/api/jobs'));
  } catch (error) {
    $('submit-error').textContent = error.message;
    return;
  }
  const rows = jobs.map((job) => {
    const row = document.createElement('tr');
    row.dataset.job = job.id;
    if (watching && watching.id === job.id) row.classList.add('selected');
    const progress = job.stage ? `${job.stage} ${job.step}/${job.total_steps}` : '';
    for (const text of [job.id.slice(0, 8), job.state, progress, job.prompt || `(${job.input})`, job.preset || 'default']) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.appendChild(cell);
    }
    row.addEventListener('click', () => watch(job.id));
    return row;
  });
  $('jobs').querySelector('tbody').replaceChildren(...rows);
}

// -- one job's live view -----------------------------------------------------------------------------------------

function watch(id) {
  if (watching) watching.source.close();
  $('job-name').textContent = id;
  for (const field of ['job-state', 'job-stage', 'job-step', 'job-eta', 'job-losses']) $(field).textContent = '\u2014';
  $('job-error').textContent = '';
  $('downloads').replaceChildren();
  $('previews').replaceChildren();
  $('event-log').replaceChildren();
  $('job-progress').value = 0;
  viewer.clear();
  $('cancel').hidden = true;
  const source = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events`);
  watching = { id, source };
  source.addEventListener('job', (message) => onEvent(JSON.parse(message.data)));
  source.onerror = () => {
    // The server ends the stream with the job; anything else is a lost connection (EventSource retries by itself).
    if (source.readyState === EventSource.CLOSED) log('stream closed');
  };
  for (const row of $('jobs').querySelectorAll('tbody tr')) row.classList.toggle('selected', row.dataset.job === id);
}

async function cancel() {
  if (!watching) return;
  try {
    await api(`/api/jobs/${encodeURIComponent(watching.id)}/cancel`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}',
    });
    log('cancel requested');
  } catch (error) {
    $('job-error').textContent = error.message;
  }
}

function onEvent(event) {
  $('cancel').hidden = event.type === 'done' || event.type === 'failed';
  log(`${event.type}${event.stage ? ' ' + event.stage : ''}${event.step !== undefined ? ' ' + event.step : ''}`);
  switch (event.type) {
    case 'queued':
      $('job-state').textContent = `queued (position ${event.position || 0})`;
      break;
    case 'stage_started':
      $('job-state').textContent = 'running';
      $('job-stage').textContent = event.stage;
      $('job-step').textContent = `0/${event.total_steps}`;
      break;
    case 'progress':
      $('job-state').textContent = 'running';
      $('job-stage').textContent = event.stage;
      $('job-step').textContent = `${event.step}/${event.total_steps}`;
      if (event.total_steps) $('job-progress').value = event.step / event.total_steps;
      if (event.eta_seconds !== undefined) $('job-eta').textContent = `${event.eta_seconds.toFixed(1)} s`;
      if (event.losses) {
        $('job-losses').textContent = Object.entries(event.losses).map(([k, v]) => `${k}=${v.toPrecision(4)}`).join('  ');
      }
      if (event.preview_url) showPreview(event);
      break;
    case 'stage_finished':
      $('job-stage').textContent = `${event.stage} (finished)`;
      break;
    case 'done':
      $('job-state').textContent = 'succeeded';
      $('job-progress').value = 1;
      watching.source.close();
      showDownloads(event.artifacts);
      refreshJobs();
      break;
    case 'failed':
      $('job-state').textContent = 'failed';
      $('job-error').textContent = event.reason;
      watching.source.close();
      refreshJobs();
      break;
  }
}

function showPreview(event) {
  const figure = document.createElement('figure');
  const image = document.createElement('img');
  image.src = event.preview_url;
  image.alt = `preview: ${event.stage} step ${event.step}`;
  const caption = document.createElement('figcaption');
  caption.textContent = `${event.stage} step ${event.step}`;
  figure.append(image, caption);
  $('previews').prepend(figure);
}

function showDownloads(artifacts) {
  const links = artifacts.map((artifact) => {
    const link = document.createElement('a');
    link.href = artifact.url;
    link.download = artifact.kind;
    link.textContent = artifact.kind;
    return link;
  });
  $('downloads').replaceChildren(...links);
  const glb = artifacts.find((artifact) => artifact.kind === 'model.glb');
  if (glb) viewer.load(glb.url);
}

function log(text) {
  const item = document.createElement('li');
  item.textContent = text;
  $('event-log').prepend(item);
}

// -- the 3D view -------------------------------------------------------------------------------------------------

class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    // preserveDrawingBuffer: the canvas can be read back (screenshots, the browser test's pixel check)
    this.renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
    this.renderer.setClearColor(BACKGROUND);
    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(40, canvas.width / canvas.height, 0.01, 100);
    this.camera.position.set(0, 0.8, 3);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.5));
    const sun = new THREE.DirectionalLight(0xffffff, 1.5);
    sun.position.set(2, 3, 2);
    this.scene.add(sun);
    this.controls = new OrbitControls(this.camera, canvas);
    this.controls.enableDamping = true;
    this.model = null;
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.renderer.setAnimationLoop(() => {
      this.controls.update();
      this.renderer.render(this.scene, this.camera);
    });
  }

  resize() {
    const { clientWidth: width, clientHeight: height } = this.canvas;
    if (!width || !height) return;
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
  }

  clear() {
    if (this.model) this.scene.remove(this.model);
    this.model = null;
    this.canvas.dataset.loaded = '';
    $('viewer-status').textContent = 'The finished model appears here; drag to orbit, scroll to zoom.';
  }

  load(url) {
    $('viewer-status').textContent = 'loading the model\u2026';
    new GLTFLoader().load(url, (gltf) => {
      this.clear();
      this.model = gltf.scene;
      this.scene.add(this.model);
      this.frame(this.model);
      this.canvas.dataset.loaded = url;  // the browser test waits for this
      $('viewer-status').textContent = 'drag to orbit, scroll to zoom';
    }, undefined, (error) => {
      $('viewer-status').textContent = `could not load the model: ${error.message || error}`;
    });
  }

  frame(object) {  // the camera looks at the model's bounding sphere from a fixed direction
    const sphere = new THREE.Box3().setFromObject(object).getBoundingSphere(new THREE.Sphere());
    const distance = (sphere.radius || 1) / Math.sin(THREE.MathUtils.degToRad(this.camera.fov / 2));
    this.controls.target.copy(sphere.center);
    this.camera.position.copy(sphere.center).add(new THREE.Vector3(0.5, 0.4, 1).normalize().multiplyScalar(distance));
    this.camera.near = distance / 100;
    this.camera.far = distance * 10;
    this.camera.updateProjectionMatrix();
  }
}

const viewer = new Viewer($('viewer'));
$('submit-form').addEventListener('submit', submit);
$('cancel').addEventListener('click', cancel);
loadPresets().catch((error) => { $('submit-error').textContent = error.message; });
refreshJobs();
setInterval(refreshJobs, 5000);
