// The console's page logic: the caller's key from session storage, the records from
// /api/v1/console/overview, and the chosen run's curves (Plotly) from its metrics route,
// fetched again every REFRESH_S seconds.
"use strict";
const REFRESH_S = 5;
const COLUMNS = {
  training_runs: ["id", "base_model", "rank", "session", "created", "last_call"],
  sessions: ["id", "created", "finished", "last_heartbeat"],
  checkpoints: ["path", "kind", "bytes", "created", "expires"],
  samplers: ["id", "base_model", "model_path", "created"],
};
let chosen = null;

async function api(path) {
  const resp = await fetch("/api/v1/console/" + path,
                           {headers: {"X-API-Key": sessionStorage.getItem("tinkerq-key")}});
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.detail || resp.statusText);
  return body;
}

function fill(name, rows) {
  const table = document.getElementById(name);
  table.replaceChildren();
  const head = table.insertRow();
  for (const col of COLUMNS[name]) head.appendChild(document.createElement("th")).textContent = col;
  for (const row of rows) {
    const tr = table.insertRow();
    for (const col of COLUMNS[name]) tr.insertCell().textContent = row[col] ?? "";
    if (name === "training_runs") {
      tr.className = "run" + (row.id === chosen ? " chosen" : "");
      tr.dataset.run = row.id;
      tr.onclick = () => { chosen = row.id; refresh(); };
    }
  }
}

async function drawCurves() {
  const box = document.getElementById("curves");
  if (!chosen) { box.textContent = "Choose a training run above."; return; }
  const data = await api("runs/" + encodeURIComponent(chosen) + "/metrics");
  document.getElementById("curves-title").textContent = "Curves of " + data.run;
  const names = Object.keys(data.metrics);
  if (!names.length) { box.textContent = "No finished step yet."; return; }
  for (const div of [...box.querySelectorAll(".chart")]) {
    if (!names.includes(div.dataset.metric)) div.remove();
  }
  if (!box.querySelector(".chart")) box.textContent = "";
  for (const name of names) {
    let div = box.querySelector(`.chart[data-metric="${CSS.escape(name)}"]`);
    if (!div) {
      div = box.appendChild(document.createElement("div"));
      div.className = "chart";
      div.dataset.metric = name;
    }
    const points = data.metrics[name];
    div.dataset.points = points.x.length;
    Plotly.react(div, [{x: points.x, y: points.y, mode: "lines+markers", name}],
                 {title: {text: name}, xaxis: {title: {text: "step"}},
                  margin: {t: 40, r: 20, b: 40, l: 60}}, {displayModeBar: false});
  }
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const records = await api("overview");
    if (!chosen && records.training_runs.length) chosen = records.training_runs[0].id;
    for (const name of Object.keys(COLUMNS)) fill(name, records[name]);
    await drawCurves();
    document.getElementById("records").hidden = false;
    error.textContent = "";
  } catch (e) {
    error.textContent = e.message;
  }
}

document.getElementById("every").textContent = REFRESH_S;
document.getElementById("login").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem("tinkerq-key", document.getElementById("key").value.trim());
  refresh();
};
document.getElementById("logout").onclick = () => {
  sessionStorage.removeItem("tinkerq-key");
  location.reload();
};
if (sessionStorage.getItem("tinkerq-key")) refresh();
setInterval(() => { if (sessionStorage.getItem("tinkerq-key")) refresh(); }, REFRESH_S * 1000);
