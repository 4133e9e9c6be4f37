// Slide list: sort by a column (click its header), filter by text and status.
(function () {
  "use strict";
  const table = document.getElementById("slides");
  if (!table) return;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows).filter((r) => r.dataset.status !== undefined);
  const text = document.getElementById("filter-text");
  const status = document.getElementById("filter-status");

  function cellValue(row, index, type) {
    const cell = row.cells[index];
    if (!cell) return type === "number" ? NaN : "";
    const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
    return type === "number" ? (raw === "" ? NaN : Number(raw)) : raw.toLowerCase();
  }

  Array.from(table.tHead.rows[0].cells).forEach((th, index) => {
    const type = th.dataset.type;
    if (!type || type === "none") return;
    th.addEventListener("click", () => {
      const asc = !th.classList.contains("sorted-asc");
      table.tHead.querySelectorAll("th").forEach((h) => h.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      const sorted = rows.slice().sort((a, b) => {
        const va = cellValue(a, index, type), vb = cellValue(b, index, type);
        if (type === "number") {
          if (Number.isNaN(va) && Number.isNaN(vb)) return 0;
          if (Number.isNaN(va)) return 1;   // unknown values last
          if (Number.isNaN(vb)) return -1;
          return asc ? va - vb : vb - va;
        }
        return asc ? va.localeCompare(vb) : vb.localeCompare(va);
      });
      sorted.forEach((r) => body.appendChild(r));
    });
  });

  function applyFilter() {
    const words = (text.value || "").toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = status.value;
    rows.forEach((r) => {
      const hay = r.dataset.search || "";
      const ok = words.every((w) => hay.includes(w)) && (!wanted || r.dataset.status === wanted);
      r.hidden = !ok;
    });
  }
  text.addEventListener("input", applyFilter);
  status.addEventListener("change", applyFilter);
})();
