"""looped.py as a literate program: web/tutorial.html, its comments as prose beside the code they
describe, in the file's order. `python web/literate.py` writes it; the tests check that the
committed page is what this writes from the committed looped.py, so it never drifts."""

import html
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE, PAGE = os.path.join(HERE, "..", "looped.py"), os.path.join(HERE, "tutorial.html")
RULE = re.compile(r"# -{10,} (.+)")  # a section's rule: `# ------------ tasks`


def sections(lines):
    """[(prose lines, code lines)]: each run of whole-line comments and the code after it. The
    module docstring is the first prose; a rule's title becomes a heading."""
    docstring_end = next(i for i, line in enumerate(lines[1:], 1) if line.startswith('"""'))
    out = [(lines[: docstring_end + 1], [])]
    for line in lines[docstring_end + 1 :]:
        comment = line.strip().startswith("#")
        if comment and (out[-1][1] or not out[-1][0]):  # a comment after code starts a section
            out.append(([], []))
        (out[-1][0] if comment else out[-1][1]).append(line)
    return out


def prose(lines):
    """Comment or docstring lines as HTML: paragraphs (`code` kept as code), indented lines as
    preformatted text, a rule as a heading."""
    blocks = []  # [kind, lines]: kind h2, p, pre or a gap between paragraphs
    for line in lines:
        rule = RULE.match(line.strip())
        comment = line.lstrip().startswith("#")
        text = line.lstrip().removeprefix("#").removeprefix(" ") if comment else line
        text = text.replace('"""', "")
        kind = "h2" if rule else "gap" if not text.strip() else "pre" if text[:4] == "    " else "p"
        if blocks and blocks[-1][0] == kind and kind in ("p", "pre"):
            blocks[-1][1].append(text)
        else:
            blocks.append([kind, [rule.group(1) if rule else text]])
    out = []
    for kind, texts in blocks:
        if kind == "h2":
            out.append(f"<h2>{html.escape(texts[0])}</h2>")
        elif kind == "p":
            out.append(f"<p>{inline(' '.join(t.strip() for t in texts))}</p>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(chr(10).join(t[4:] for t in texts))}</pre>")
    return "\n".join(out)


def inline(text):
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def page(source):
    rows = []
    for comments, code in sections(source.splitlines()):
        while code and not code[-1].strip():
            code.pop()
        block = html.escape("\n".join(code).strip("\n"))
        rows.append(
            f'<div class="row">\n<div class="prose">{prose(comments)}</div>\n'
            f'<pre class="code"><code>{block}</code></pre>\n</div>'
        )
    return TEMPLATE.replace("{rows}", "\n".join(rows))


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>looped.py, read as a tutorial</title>
  <link rel="icon" href="data:,">
  <style>
    body { font: 15px/1.5 system-ui, sans-serif; margin: 0; color: #222; }
    header { padding: 1em 1.5em; border-bottom: 1px solid #ddd; }
    h1 { font-size: 1.4em; margin: 0 0 0.2em; }
    h2 { font-size: 1.1em; margin: 0.8em 0 0.3em; }
    .row { display: grid; grid-template-columns: minmax(16em, 1fr) minmax(0, 2fr); }
    .row { border-bottom: 1px solid #f0f0f0; }
    .prose { padding: 0.3em 1.5em; background: #fafafa; }
    .prose p { margin: 0.4em 0; }
    .prose pre { font-size: 12px; overflow-x: auto; }
    .code { margin: 0; padding: 0.5em 1em; overflow-x: auto; font-size: 13px; background: #fff; }
    code { font-family: ui-monospace, monospace; }
    @media (max-width: 800px) { .row { grid-template-columns: 1fr; } }
  </style>
</head>
<body>
<header>
  <h1>looped.py, read as a tutorial</h1>
  <p>The whole of <code>looped.py</code>, the paper's method in reading order: its comments on the
  left, the code they describe on the right. <a href="index.html">The demo</a> runs a model it
  trained; the paper is <a href="https://arxiv.org/abs/2311.12424">arXiv 2311.12424</a>. Written
  by <code>python web/literate.py</code> from the source; do not edit by hand.</p>
</header>
{rows}
</body>
</html>
"""

if __name__ == "__main__":
    with open(SOURCE) as f, open(PAGE, "w") as out:
        out.write(page(f.read()))
    print(f"wrote {os.path.relpath(PAGE)}")
