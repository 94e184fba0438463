"""web/literate.py: the tutorial page is looped.py as it is now, and it shows all of it."""

import html
import importlib.util
import os
import re

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "web")


def test_the_tutorial_is_looped_py_as_it_is_now():
    """web/tutorial.html is what web/literate.py writes from the committed looped.py, and that
    shows every line of looped.py's code, in order; the two pages link to each other."""
    spec = importlib.util.spec_from_file_location("literate", os.path.join(WEB, "literate.py"))
    literate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(literate)
    with open(literate.SOURCE) as f:
        source = f.read()
    with open(literate.PAGE) as f:
        committed = f.read()
    assert literate.page(source) == committed, "web/tutorial.html is stale: python web/literate.py"
    shown = html.unescape(re.sub(r"<[^>]+>", "", committed))
    code = [line.strip() for line in source.splitlines() if line.strip()]
    code = [line for line in code if not line.startswith("#")]
    at = 0
    for line in code:  # every line of code, in order
        at = shown.index(line.replace('"""', ""), at)
    assert 'href="index.html"' in committed
    with open(os.path.join(WEB, "index.html")) as f:
        assert 'href="tutorial.html"' in f.read()
