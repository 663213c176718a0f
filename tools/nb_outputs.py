"""Print the text outputs of an executed notebook (a quick look without a browser)."""
import sys

import nbformat

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                print(c.id, "|", o.text[:600].rstrip())
            elif o.output_type in ("execute_result", "display_data"):
                d = o.data
                if "text/plain" in d and not any("plotly" in k or "widget" in k for k in d):
                    print(c.id, "|", d["text/plain"][:900])
                else:
                    print(c.id, "|", [k for k in d if k != "text/plain"])
            elif o.output_type == "error":
                print(c.id, "| ERROR", o.ename, o.evalue)
