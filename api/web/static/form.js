// The parameter form, built from the stream params JSON schema the server
// publishes (GET /web/params-schema): every field a stream accepts, with the
// API's own types, bounds, enums and defaults. HINTS only arranges fields
// into groups and picks a few widgets; a field the schema has and HINTS does
// not know still gets a control (in "Other").

const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
};

// group: where a top-level field goes; basic groups show first, the rest fold into "Advanced"
export const GROUPS = [
  { id: "basic", title: null, basic: true },
  { id: "blending", title: "Prompt and seed blending" },
  { id: "controlnets", title: "ControlNets" },
  { id: "ip_adapter", title: "IP-Adapter (style image)" },
  { id: "loras", title: "LoRAs" },
  { id: "processing", title: "Processing blocks" },
  { id: "pipeline", title: "Pipeline" },
  { id: "other", title: "Other" },
];

const HINTS = {
  model_id: { group: "basic", title: "Model", datalist: "models" },
  prompt: { group: "basic", widget: "textarea", blend: "text" },
  negative_prompt: { group: "basic", widget: "textarea" },
  guidance_scale: { group: "basic", step: 0.05 },
  delta: { group: "basic", step: 0.01 },
  t_index_list: { group: "basic", title: "Strength (t_index_list)",
                  help: "denoising steps used, 1-4 rising values: lower keeps more of the input" },
  seed: { group: "basic", blend: "integer" },
  prompt_interpolation_method: { group: "blending" },
  normalize_prompt_weights: { group: "blending" },
  seed_interpolation_method: { group: "blending" },
  normalize_seed_weights: { group: "blending" },
  controlnets: { group: "controlnets", title: "ControlNets" },
  ip_adapter: { group: "ip_adapter", title: "IP-Adapter" },
  ip_adapter_style_image_url: { group: "ip_adapter", title: "Style image", widget: "image" },
  lora_dict: { group: "loras", title: "LoRAs (path or hub id: weight)" },
  use_lcm_lora: { group: "loras" },
  lcm_lora_id: { group: "loras" },
  image_preprocessing: { group: "processing" },
  image_postprocessing: { group: "processing" },
  latent_preprocessing: { group: "processing" },
  latent_postprocessing: { group: "processing" },
  num_inference_steps: { group: "pipeline" },
  width: { group: "pipeline", step: 64 },
  height: { group: "pipeline", step: 64 },
  fit: { group: "pipeline", help: "input of another aspect ratio: crop or pad (empty: server default)" },
};
// nested fields with a widget of their own
const NESTED = {
  "controlnets.model_id": { datalist: "controlnets" },
  "controlnets.preprocessor": { datalist: "processors" },
  "processors.type": { datalist: "processors" },
};

const clone = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const titleOf = (name, schema) => schema.title || name.replace(/_/g, " ");

export class ParamsForm {
  /** info: the body of /web/params-schema; onChange(key) after a field's value changed. */
  constructor(root, info, onChange) {
    this.root = root;
    this.info = info;
    this.defs = info.schema.$defs || {};
    this.onChange = onChange;
    this.defaults = clone(info.defaults);
    this.values = clone(info.defaults);
    this.reload = new Set(info.reload_fields);
    this.extras = []; // controls added from outside (the effect picker)
    this.datalists();
    this.render();
  }

  datalists() {
    const lists = {
      models: this.info.models.map((m) => [m.id, m.family]),
      controlnets: Object.entries(this.info.controlnets).flatMap(([family, ids]) => ids.map((id) => [id, family])),
      processors: this.info.processors.map((p) => [p, ""]),
    };
    for (const [id, entries] of Object.entries(lists)) {
      const list = el("datalist", { id: `list-${id}` });
      for (const [value, label] of entries) list.append(el("option", { value, label }));
      document.body.append(list);
    }
  }

  /** The params that differ from the server's defaults: what a preset or a new stream needs. */
  changed() {
    const out = {};
    for (const [key, value] of Object.entries(this.values)) {
      if (!same(value, this.defaults[key])) out[key] = clone(value);
    }
    return out;
  }

  /** Replace the values (a preset, the params a stream really runs) and redraw the controls. */
  set(params, { fromDefaults = false } = {}) {
    const base = fromDefaults ? clone(this.defaults) : this.values;
    this.values = { ...base, ...clone(params) };
    this.render();
  }

  resolve(schema) {
    if (schema && schema.$ref) return { ...this.defs[schema.$ref.split("/").pop()], ...schema, $ref: undefined };
    return schema;
  }

  render() {
    const openGroups = new Set([...this.root.querySelectorAll("details[open]")].map((d) => d.dataset.group));
    this.root.replaceChildren();
    const props = this.info.schema.properties;
    const sections = {};
    const advanced = el("details", { id: "advanced" });
    advanced.dataset.group = "advanced";
    advanced.open = openGroups.has("advanced");
    advanced.append(el("summary", { textContent: "Advanced" }));
    for (const group of GROUPS) {
      if (group.basic) { sections[group.id] = this.root; continue; }
      const box = el("details", { className: "group" });
      box.dataset.group = group.id;
      box.open = openGroups.has(group.id);
      box.append(el("summary", { textContent: group.title }));
      sections[group.id] = box;
    }
    for (const control of this.extras) this.root.append(control);
    for (const [name, schema] of Object.entries(props)) {
      const hint = HINTS[name] || {};
      const group = sections[hint.group] ? hint.group : "other";
      sections[group].append(this.field(name, schema, hint));
    }
    for (const group of GROUPS) {
      if (!group.basic && sections[group.id].children.length > 1) advanced.append(sections[group.id]);
    }
    this.root.append(advanced);
  }

  field(name, schema, hint) {
    const wrap = el("div", { className: "field" });
    wrap.dataset.field = name;
    const title = el("span", { className: "title", textContent: hint.title || titleOf(name, schema) });
    const label = el("div", { className: "label" }, title);
    if (this.reload.has(name)) {
      label.append(el("span", { className: "badge reload", textContent: "reload",
                                title: "changing this rebuilds the pipeline; the old one serves meanwhile" }));
    } else if (this.info.reload_parts[name]) {
      label.append(el("span", { className: "badge reload partly", textContent: "partly reload",
                                title: this.info.reload_parts[name] }));
    }
    wrap.append(label);
    const set = (value) => { this.values[name] = value; this.onChange(name); };
    wrap.append(this.control(name, schema, this.values[name], set, hint, name));
    if (hint.help || this.info.reload_parts[name]) {
      wrap.append(el("small", { className: "muted help", textContent: hint.help || this.info.reload_parts[name] }));
    }
    return wrap;
  }

  /** A control for ``value`` of ``schema``; ``set(newValue)`` on every change. */
  control(name, rawSchema, value, set, hint = {}, path = name) {
    let schema = this.resolve(rawSchema);
    let nullable = false;
    if (schema.anyOf) {
      const branches = schema.anyOf.map((b) => this.resolve(b));
      nullable = branches.some((b) => b.type === "null");
      const real = branches.filter((b) => b.type !== "null");
      if (real.length > 1 && hint.blend) return this.blendable(name, real, value, set, hint);
      schema = { ...schema, ...real[0], anyOf: undefined };
    }
    if (hint.widget === "image") return this.imageControl(name, value, set);
    if (schema.enum) return this.select(name, schema.enum, value, set, nullable);
    if (schema.type === "boolean") {
      const input = el("input", { type: "checkbox", name, checked: Boolean(value) });
      input.addEventListener("change", () => set(input.checked));
      return input;
    }
    if (schema.type === "integer" || schema.type === "number") return this.numberControl(name, schema, value, set, hint);
    if (schema.type === "string") {
      const input = hint.widget === "textarea" ? el("textarea", { rows: 2 }) : el("input", { type: "text" });
      input.name = name;
      input.value = value ?? "";
      const list = hint.datalist || (NESTED[path] || {}).datalist;
      if (list) input.setAttribute("list", `list-${list}`);
      if (schema.maxLength) input.maxLength = schema.maxLength;
      input.addEventListener("input", () => set(nullable && input.value === "" ? null : input.value));
      return input;
    }
    if (schema.type === "array" && schema.items) {
      const items = this.resolve(schema.items);
      if (items.type === "integer" || items.type === "number") return this.numberList(name, value, set);
      if (items.type === "object") return this.objectList(name, items, value, set, nullable);
    }
    if (schema.type === "object" && schema.properties) return this.objectControl(name, schema, value, set, nullable);
    if (schema.type === "object" && schema.additionalProperties && schema.additionalProperties.type === "number") {
      return this.weights(name, value, set, nullable);
    }
    return this.jsonControl(name, value, set, nullable);
  }

  select(name, options, value, set, nullable) {
    const select = el("select", { name });
    if (nullable) select.append(el("option", { value: "", textContent: "(server default)" }));
    for (const option of options) select.append(el("option", { value: option, textContent: option }));
    select.value = value ?? "";
    select.addEventListener("change", () => set(select.value === "" && nullable ? null : select.value));
    return select;
  }

  numberControl(name, schema, value, set, hint) {
    const integer = schema.type === "integer";
    const box = el("div", { className: "number" });
    const number = el("input", { type: "number", name });
    const bounded = schema.minimum !== undefined && schema.maximum !== undefined && schema.maximum - schema.minimum <= 1000;
    const step = hint.step ?? schema.multipleOf ?? (integer ? 1 : 0.01);
    const inputs = [number];
    if (bounded) {
      const range = el("input", { type: "range", min: schema.minimum, max: schema.maximum, step });
      range.setAttribute("aria-label", `${name} slider`);
      inputs.unshift(range);
      box.append(range);
    }
    for (const input of inputs) {
      if (schema.minimum !== undefined) input.min = schema.minimum;
      if (schema.maximum !== undefined) input.max = schema.maximum;
      input.step = step;
      input.value = value ?? "";
      input.addEventListener("input", () => {
        for (const other of inputs) if (other !== input) other.value = input.value;
        if (input.value === "") return;
        set(integer ? parseInt(input.value, 10) : parseFloat(input.value));
      });
    }
    box.append(number);
    return box;
  }

  numberList(name, value, set) {
    const input = el("input", { type: "text", name, value: (value || []).join(", "), inputMode: "numeric" });
    input.addEventListener("input", () => {
      const list = input.value.split(/[\s,]+/).filter(Boolean).map((v) => parseInt(v, 10));
      if (list.length && list.every(Number.isFinite)) set(list);
    });
    return input;
  }

  /** prompt / seed: one value, or a blend of weighted values ([[value, weight], ...]). */
  blendable(name, branches, value, set, hint) {
    const box = el("div", { className: "blend" });
    const scalar = branches.find((b) => b.type !== "array");
    const draw = () => {
      box.replaceChildren();
      const list = Array.isArray(value);
      if (!list) {
        box.append(this.control(name, scalar, value, (v) => { value = v; set(v); }, hint));
      } else {
        value.forEach((entry, i) => {
          const row = el("div", { className: "row" });
          const update = () => set(value.map((e) => [...e]));
          const item = hint.blend === "text" ? el("input", { type: "text", value: entry[0] })
                                             : el("input", { type: "number", value: entry[0], step: 1, min: 0 });
          item.name = `${name}.${i}`;
          item.addEventListener("input", () => {
            entry[0] = hint.blend === "text" ? item.value : parseInt(item.value || "0", 10); update();
          });
          const weight = el("input", { type: "number", value: entry[1], step: 0.05, min: 0, className: "weight" });
          weight.name = `${name}.${i}.weight`;
          weight.setAttribute("aria-label", "weight");
          weight.addEventListener("input", () => { entry[1] = parseFloat(weight.value || "0"); update(); });
          const remove = el("button", { type: "button", textContent: "×", title: "remove" });
          remove.addEventListener("click", () => {
            value.splice(i, 1);
            if (value.length === 1) value = value[0][0];
            set(clone(value)); draw();
          });
          row.append(item, weight, remove);
          box.append(row);
        });
      }
      const add = el("button", { type: "button", textContent: list ? `+ ${name}` : `blend ${name}s`, className: "small" });
      add.dataset.blend = name;
      add.addEventListener("click", () => {
        const fresh = hint.blend === "text" ? "" : Math.floor(Math.random() * 1e6);
        value = Array.isArray(value) ? [...value, [fresh, 0.5]] : [[value, 1.0], [fresh, 0.5]];
        set(clone(value)); draw();
      });
      box.append(add);
    };
    draw();
    return box;
  }

  objectControl(name, schema, value, set, nullable) {
    const box = el("div", { className: "object" });
    const defaults = () => Object.fromEntries(
      Object.entries(schema.properties).filter(([, s]) => s.default !== undefined).map(([k, s]) => [k, clone(s.default)]));
    const draw = () => {
      box.replaceChildren();
      if (nullable) {
        const on = el("input", { type: "checkbox", name: `${name}.use`, checked: value !== null && value !== undefined });
        on.addEventListener("change", () => { value = on.checked ? defaults() : null; set(clone(value)); draw(); });
        box.append(el("label", { className: "inline" }, on, ` use ${name.replace(/_/g, " ")}`));
        if (value === null || value === undefined) return;
      }
      value = value || defaults();
      for (const [key, sub] of Object.entries(schema.properties)) {
        const line = el("label", { className: "sub" }, el("span", { textContent: titleOf(key, sub) }));
        line.append(this.control(`${name}.${key}`, sub, value[key],
                                 (v) => { value = { ...value, [key]: v }; set(clone(value)); },
                                 {}, `${name}.${key}`));
        box.append(line);
      }
    };
    draw();
    return box;
  }

  objectList(name, itemSchema, value, set) {
    const box = el("div", { className: "list" });
    const fresh = () => {
      const item = Object.fromEntries(Object.entries(itemSchema.properties)
        .filter(([, s]) => s.default !== undefined).map(([k, s]) => [k, clone(s.default)]));
      if ("model_id" in itemSchema.properties) item.model_id = this.suggestControlnet();
      if ("type" in itemSchema.properties && !item.type) item.type = "blur";
      return item;
    };
    const draw = () => {
      box.replaceChildren();
      (value || []).forEach((item, i) => {
        const card = el("fieldset", { className: "card" }, el("legend", { textContent: `${name.split(".").pop()} ${i + 1}` }));
        for (const [key, sub] of Object.entries(itemSchema.properties)) {
          const line = el("label", { className: "sub" }, el("span", { textContent: titleOf(key, sub) }));
          line.append(this.control(`${name}.${i}.${key}`, sub, item[key], (v) => {
            value = value.map((it, j) => (j === i ? { ...it, [key]: v } : it)); set(clone(value));
          }, {}, `${name.split(".").pop()}.${key}`));
          card.append(line);
        }
        const remove = el("button", { type: "button", textContent: "Remove", className: "small" });
        remove.addEventListener("click", () => { value = value.filter((_, j) => j !== i); set(clone(value)); draw(); });
        card.append(remove);
        box.append(card);
      });
      const add = el("button", { type: "button", textContent: `+ add`, className: "small" });
      add.dataset.add = name;
      add.addEventListener("click", () => { value = [...(value || []), fresh()]; set(clone(value)); draw(); });
      box.append(add);
    };
    draw();
    return box;
  }

  suggestControlnet() {
    const family = this.info.model_families[this.values.model_id];
    const ids = family ? this.info.controlnets[family] : Object.values(this.info.controlnets).flat();
    const used = new Set((this.values.controlnets || []).map((c) => c.model_id));
    return ids.find((id) => !used.has(id)) || ids[0];
  }

  weights(name, value, set, nullable) {
    const box = el("div", { className: "weights" });
    let rows = Object.entries(value || {});
    const emit = () => {
      const dict = Object.fromEntries(rows.filter(([k]) => k));
      set(Object.keys(dict).length || !nullable ? dict : null);
    };
    const draw = () => {
      box.replaceChildren();
      rows.forEach((row, i) => {
        const key = el("input", { type: "text", value: row[0], placeholder: "path or hub id" });
        key.name = `${name}.${i}.key`;
        key.addEventListener("input", () => { row[0] = key.value; emit(); });
        const weight = el("input", { type: "number", value: row[1], step: 0.05, className: "weight" });
        weight.name = `${name}.${i}.weight`;
        weight.addEventListener("input", () => { row[1] = parseFloat(weight.value || "0"); emit(); });
        const remove = el("button", { type: "button", textContent: "×", title: "remove" });
        remove.addEventListener("click", () => { rows = rows.filter((r) => r !== row); emit(); draw(); });
        box.append(el("div", { className: "row" }, key, weight, remove));
      });
      const add = el("button", { type: "button", textContent: "+ add", className: "small" });
      add.dataset.add = name;
      add.addEventListener("click", () => { rows.push(["", 1.0]); draw(); });
      box.append(add);
    };
    draw();
    return box;
  }

  jsonControl(name, value, set, nullable) {
    const input = el("textarea", { rows: 1, name, value: value === undefined || value === null ? "" : JSON.stringify(value) });
    input.placeholder = "JSON";
    input.addEventListener("input", () => {
      if (input.value.trim() === "" && nullable) { input.classList.remove("invalid"); set(null); return; }
      try { set(JSON.parse(input.value || "{}")); input.classList.remove("invalid"); }
      catch { input.classList.add("invalid"); }
    });
    return input;
  }

  /** A style image: a URL, or a file read into a data: URL (the server takes either, up to 5 MB). */
  imageControl(name, value, set) {
    const box = el("div", { className: "image" });
    const url = el("input", { type: "text", name, placeholder: "https://… or choose a file",
                              value: value && !value.startsWith("data:") ? value : "" });
    const file = el("input", { type: "file", accept: "image/*", name: `${name}.file` });
    const preview = el("img", { className: "thumb", alt: "" });
    if (value) preview.src = value;
    preview.hidden = !value;
    url.addEventListener("input", () => set(url.value || null));
    file.addEventListener("change", () => {
      const chosen = file.files[0];
      if (!chosen) return;
      const reader = new FileReader();
      reader.onload = () => { preview.src = reader.result; preview.hidden = false; url.value = ""; set(reader.result); };
      reader.readAsDataURL(chosen);
    });
    const clear = el("button", { type: "button", textContent: "×", title: "no style image" });
    clear.addEventListener("click", () => { url.value = ""; file.value = ""; preview.hidden = true; set(null); });
    box.append(el("div", { className: "row" }, url, clear), file, preview);
    return box;
  }
}
