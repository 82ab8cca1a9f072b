"""The docs stay true: README's configuration table is the settings' own; in README and every docs/*.md page the
commands name real things, the paths and links resolve, and the snippets that can run offline run."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from service.config import Settings

from .support import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent


def pages() -> list[Path]:
    """README and every page of docs/: what the snippet, path and link checks read."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _without_fences(text: str) -> str:
    """The text with its fenced blocks blanked out (their backticks would pair with the spans'), lines kept."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def test_configuration_table_matches_settings() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.table() in readme, "README's table is stale: run .venv/bin/python scripts/config_table.py"
    for name, _, _ in Settings.describe():
        assert f"`{name}`" in readme


def test_the_two_commands_exist_and_are_executable() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in ("./scripts/run", "./scripts/test"):
        assert f"```sh\n{command}\n```" in readme
        assert os.access(ROOT / command, os.X_OK)
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


# -- every shell snippet: what it names exists, and what can run offline runs ------------------------------------

SHELL_VARS = {"TOKEN"}  # shell variables the snippets set for themselves (anything else must be a setting)
EXTERNAL = {"curl", "redis-server", "docker", "kubectl", "apt-get", "mkdir", "openssl"}  # tools the docs assume are installed
VENV_TOOLS = {"python", "pip", "uvicorn", "sse-relay", "sse-relay-token"}  # the extras install them: must be there
# Linters no extra installs (docs/development.md says `.venv/bin/pip install ruff mypy`): named, not required, but
# the project must configure them.
LINTERS = {"ruff": "[tool.ruff]", "mypy": "[tool.mypy]"}
SEPARATORS = {"&&", "||", ";", "&", "|", "(", ")"}


def shell_snippets() -> list[tuple[str, int, str]]:
    """(page, line number, body) of every ```sh block in README and docs/*.md."""
    found = []
    for page in pages():
        text = page.read_text()
        found += [(_name(page), text[: m.start()].count("\n") + 1, m.group(1))
                  for m in re.finditer(r"```sh\n(.*?)```", text, re.S)]
    return found


def inline_commands() -> list[tuple[str, int, str]]:
    """Inline code spans that are commands to type: they start with ./scripts/, .venv/bin/ or VAR=... ./scripts/."""
    found = []
    for page in pages():
        text = _without_fences(page.read_text())
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            # python -m with arguments is an instruction too (a bare `python -m service` names the process)
            if re.match(r"(\./scripts/|\.venv/bin/|[A-Z_]+=\S* \./scripts/|python3? -m \S+ \S)", span):
                found.append((_name(page), text[: m.start()].count("\n") + 1, span))
    return found


def test_docs_name_only_files_that_exist() -> None:
    """Inline repository paths (`examples/consume.py`, `deploy/k8s/`, ...) in README and docs/*.md exist, outputs
    the checkout ignores aside; and the chat page's files are where its page says they are."""
    ignored = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    missing, chat_page = [], []
    for page in pages():
        text = _without_fences(page.read_text())
        missing += [f"{_name(page)}: {span}" for span in re.findall(r"`([^`]+)`", text)
                    if re.fullmatch(r"(\./)?(frontend|examples|deploy|tests|service|scripts|bench|docs)/[\w./-]*", span)
                    and not (ROOT / span).exists() and not any(span.strip("/").startswith(i) for i in ignored)]
        chat_page += re.findall(r"three static files in `frontend/` \(([^)]*)\)", text)
    assert not missing, missing
    assert len(chat_page) == 1, "the sentence about the chat page's files moved or doubled: update this test"
    files = [span for span in re.findall(r"`([^`]+)`", chat_page[0]) if not span.endswith("/")]
    assert len(files) == 3 and all((ROOT / "frontend" / f).is_file() for f in files), files



def test_the_api_tables_name_every_route() -> None:
    """README's endpoint table and docs/api.md's name every route of /openapi.json (which a test keeps in step
    with the app's routes)."""
    from service.openapi import OPENAPI

    for page in (ROOT / "README.md", ROOT / "docs" / "api.md"):
        rows = [line for line in page.read_text().splitlines() if line.startswith("| `")]
        for path, operations in OPENAPI["paths"].items():
            for method in operations:
                pattern = rf"`{method.upper()} {re.escape(path)}(\?[^`]*)?`"
                assert any(re.search(pattern, row) for row in rows), f"{_name(page)}: no {method.upper()} {path}"

# -- every relative link resolves -------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup out, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _without_fences(page.read_text()), re.M):
        slug = _slug(m.group(1))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link and image, and every reference definition, outside code."""
    text = _without_fences(text)
    text = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), text)  # code spans are not links
    found = [(text[: m.start()].count("\n") + 1, m.group(1))
             for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", text)]
    found += [(text[: m.start()].count("\n") + 1, m.group(1))
              for m in re.finditer(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)]
    return found


def check_link(page: Path, target: str) -> str | None:
    """What is wrong with one link of a page (None: nothing). Relative links must name a file or folder of the
    repository (from the page's own folder), and an anchor a heading of the page it points at."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check
        return None
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.is_relative_to(ROOT):
        return f"{target} points outside the repository"
    if not resolved.exists():
        return f"{target}: no {resolved.relative_to(ROOT)} in the repository"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: {resolved.relative_to(ROOT)} has no heading #{anchor}"
    return None


def test_every_relative_link_resolves() -> None:
    problems, count = [], 0
    for page in pages():
        for line, target in markdown_links(page.read_text()):
            count += 1
            if problem := check_link(page, target):
                problems.append(f"{_name(page)}:{line}: {problem}")
    assert not problems, "\n".join(problems)
    assert count >= 30, "the link checker found almost no links: is it still reading the pages?"


def test_readme_links_every_docs_page() -> None:
    """A page README does not link is a page nobody finds."""
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in markdown_links((ROOT / "README.md").read_text())}
    unlinked = [_name(page) for page in pages()[1:] if page not in linked]
    assert not unlinked, f"README's Documentation section does not link {unlinked}"


def test_the_link_checker_catches_drift(tmp_path: Path) -> None:
    page = ROOT / "docs" / "page.md"  # never written: check_link only resolves against it
    assert check_link(page, "reliability.md") is None
    assert check_link(page, "../README.md") is None
    assert check_link(page, "https://nchan.io") is None
    assert "no docs/relability.md" in str(check_link(page, "relability.md"))
    assert "no README.md/x" in str(check_link(page, "../README.md/x"))
    assert "outside the repository" in str(check_link(page, "../../etc/passwd"))
    assert "has no heading #no-such-heading" in str(check_link(page, "../README.md#no-such-heading"))
    text = "[a](x.md) ![b](y.png \"t\") `[c](not-a-link.md)`\n```\n[d](fenced.md)\n```\n[e]: z.md\n"
    assert [t for _, t in markdown_links(text)] == ["x.md", "y.png", "z.md"]
    assert _slug("Deploying: docker compose, load balancer, Kubernetes") == \
        "deploying-docker-compose-load-balancer-kubernetes"
    assert _slug("`GET /events`: several [channels](api.md)") == "get-events-several-channels"


def simple_commands(script: str) -> list[list[str]]:
    """The simple commands of a snippet, each as its words (comments dropped; `$(...)`, pipes and lists split)."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


@functools.cache
def help_text(module: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"`python -m {module} --help` failed:\n{result.stderr[-2000:]}"
    return result.stdout


def _api_route(method: str, url: str) -> bool:
    from service.openapi import OPENAPI

    path = urlsplit(url if "://" in url else f"http://{url}").path
    if path == "/":
        return method == "get"
    for template, operations in OPENAPI["paths"].items():
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path) and method in operations:
            return True
    return False


def check_command(words: list[str], where: str) -> list[str]:
    """What is wrong with one command of the docs, as messages (empty: nothing)."""
    problems: list[str] = []
    settings = {name for name, _, _ in Settings.describe()}
    if words and words[0] == "export":
        words = words[1:]
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name = words[0].split("=", 1)[0]
        if name not in settings and name not in SHELL_VARS:
            problems.append(f"{where}: {name} is not a setting (service/config.py)")
        words = words[1:]
    if not words:
        return problems
    command, args = words[0], words[1:]
    for arg in args:  # repository paths must exist
        if ("/" in arg and not arg.startswith(("-", "/", "$")) and "://" not in arg and " " not in arg
                and ":" not in arg and not arg.startswith(("{", "'"))):
            if not (ROOT / arg).exists():
                problems.append(f"{where}: {arg} does not exist in the repository")
    if command in ("python", "python3", "pip", "uvicorn", "pytest"):
        problems.append(f"{where}: bare `{command}` is not the project's virtualenv: write .venv/bin/{command}")
    elif command.startswith("./"):
        if not os.access(ROOT / command, os.X_OK):
            problems.append(f"{where}: {command} is not an executable in the repository")
    elif command.startswith(".venv/bin/") and command.removeprefix(".venv/bin/") in LINTERS:
        if LINTERS[command.removeprefix(".venv/bin/")] not in (ROOT / "pyproject.toml").read_text():
            problems.append(f"{where}: {command}: pyproject.toml does not configure it")
    elif command.startswith(".venv/bin/"):
        tool = command.removeprefix(".venv/bin/")
        if tool not in VENV_TOOLS or not (Path(sys.executable).parent / tool).exists():
            problems.append(f"{where}: {command} is not installed in the virtualenv")
        elif tool == "python" and args[:1] == ["-m"]:
            module = args[1]
            if importlib.util.find_spec(module) is None:
                problems.append(f"{where}: no module {module}")
            else:
                usage = help_text(module)
                for option in (a.split("=", 1)[0] for a in args[2:] if a.startswith("-")):
                    if not re.search(rf"(?<![\w-]){re.escape(option)}\b", usage):
                        problems.append(f"{where}: `python -m {module}` has no option {option}")
        elif tool in ("sse-relay", "sse-relay-token"):  # the installed commands: their options must exist too
            usage = help_text({"sse-relay": "service", "sse-relay-token": "service.tokens"}[tool])
            for option in (a.split("=", 1)[0] for a in args if a.startswith("-")):
                if not re.search(rf"(?<![\w-]){re.escape(option)}\b", usage):
                    problems.append(f"{where}: `{tool}` has no option {option}")
        elif tool == "python" and args[:1] == ["-c"]:
            compile(args[1], where, "exec")
        elif tool == "python":
            if not (ROOT / args[0]).is_file():
                problems.append(f"{where}: {args[0]} does not exist")
        elif tool == "uvicorn":
            module = args[0].split(":")[0]
            if importlib.util.find_spec(module) is None:
                problems.append(f"{where}: no module {module}")
    elif command == "curl":
        method = args[args.index("-X") + 1].lower() if "-X" in args else "get"
        for arg in args:
            if re.match(r"(https?://)?(localhost|127\.0\.0\.1):\d+", arg) and not _api_route(method, arg):
                problems.append(f"{where}: {method.upper()} {arg} is not a route of the API")
        if "-d" in args:
            json.loads(args[args.index("-d") + 1])  # a body the docs show must be JSON
    elif command == "redis-server":
        options = dict(zip(args[::2], args[1::2]))
        if options.get("--bind") not in ("127.0.0.1", "::1"):
            problems.append(f"{where}: redis-server listens on every interface: add --bind 127.0.0.1")
        directory = options.get("--dir", ".")
        if not Path(directory).is_absolute() or Path(directory).resolve().is_relative_to(ROOT):
            problems.append(f"{where}: redis-server writes its files into the checkout: add --dir /tmp/...")
    elif command not in EXTERNAL:
        problems.append(f"{where}: unknown command {command!r} (a real one? add it to EXTERNAL)")
    return problems


def test_docs_shell_snippets_name_real_commands_paths_modules_options_settings_and_routes() -> None:
    problems: list[str] = []
    snippets = shell_snippets()
    assert len(snippets) >= 8
    for page, line, body in snippets:
        for words in simple_commands(body):
            problems += check_command(words, f"{page}:{line} ({' '.join(words)[:60]})")
    spans = inline_commands()
    for page, line, span in spans:
        for words in simple_commands(span):
            problems += check_command(words, f"{page}:{line} (`{span[:60]}`)")
    assert not problems, "\n".join(problems)
    assert any(span.startswith(".venv/bin/python -m bench") for _, _, span in spans), "inline commands not found"


def test_the_snippet_checker_catches_drift() -> None:
    """The checker must fail the mistakes README used to have, or passing proves nothing."""
    bad = [
        ("python -m service.tokens --sub alice", "bare `python`"),
        (".venv/bin/python -m service.tokenz --sub alice", "no module"),
        (".venv/bin/python -m service.tokens --subject alice", "no option --subject"),
        ("TRUST_PROXY_HEADER=1 ./scripts/run", "not a setting"),
        ("redis-server --port 6380 --appendonly yes &", "every interface"),
        ("redis-server --port 6380 --bind 127.0.0.1 --dir . --appendonly yes", "into the checkout"),
        ("kubectl apply -k deploy/k8z", "does not exist"),
        ("curl -X POST http://127.0.0.1:8000/channel/chat/messages -d '{}'", "not a route"),
        ("./scripts/serve", "not an executable"),
        ("nc -l 8000", "unknown command"),
        (".venv/bin/flake8 .", "not installed in the virtualenv"),
        (".venv/bin/sse-relay-token --subject alice", "no option --subject"),
        (".venv/bin/sse-relay --prot 9000", "no option --prot"),
    ]
    for script, expected in bad:
        problems = [p for words in simple_commands(script) for p in check_command(words, script)]
        assert any(expected in p for p in problems), (script, problems)


@pytest.fixture
def curl_to(tmp_path: Path) -> Callable[[int], dict[str, str]]:
    """An environment in which every `curl` of a snippet reaches the given port instead of the docs' 8000 and
    gives up on a stream after 2 s (through curl's own config file: the snippets run unchanged)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")

    def env(port: int) -> dict[str, str]:
        home = tmp_path / f"home-{port}"
        home.mkdir(exist_ok=True)
        (home / ".curlrc").write_text(f'connect-to = "::127.0.0.1:{port}"\nmax-time = 2\n')
        return {**os.environ, "HOME": str(home)}

    return env


def _snippet(marker: str) -> str:
    found = [body for _, _, body in shell_snippets() if marker in body]
    assert len(found) == 1, f"README and docs/ have {len(found)} snippets with {marker!r}"
    return found[0]


def test_readme_try_it_snippet_runs(tmp_path: Path, curl_to: Callable[[int], dict[str, str]]) -> None:
    snippet = _snippet("curl -N http://127.0.0.1:8000/channels/chat/events")
    svc = ServiceProcess(tmp_path, env={"PUBLIC_CHANNELS": "chat", "LOG_LEVEL": "warning"}, name="try").start()
    try:
        result = subprocess.run(["bash", "-c", snippet], cwd=ROOT, env=curl_to(svc.port), capture_output=True,
                                text=True, timeout=30)
    finally:
        svc.kill()
    stream, _, answer = result.stdout.rpartition("\n")
    assert "retry: " in stream and "event: relay.hello" in stream, result.stdout  # the stream README shows
    assert re.fullmatch(r'\{"id":"\d+-\d+(-[0-9a-z]+)?","channel":"chat"\}', answer), result  # `# → 202 {"id":...}`


def test_readme_token_snippet_runs(tmp_path: Path, curl_to: Callable[[int], dict[str, str]]) -> None:
    """Mint a token as docs/security.md says (the relay gets the same JWT_SECRET), then publish and stream with
    it."""
    snippet = _snippet("service.tokens")
    mint, _, use = snippet.partition("\ncurl ")
    minted = subprocess.run(["bash", "-c", mint + '\nprintf "%s\\n%s\\n" "$JWT_SECRET" "$TOKEN"'], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert minted.returncode == 0 and len(minted.stdout.split()) == 2, minted
    secret, token = minted.stdout.split()
    svc = ServiceProcess(tmp_path, env={"JWT_SECRET": secret, "PUBLIC_CHANNELS": "chat", "LOG_LEVEL": "warning"},
                         name="tokens").start()
    try:
        result = subprocess.run(["bash", "-c", "curl " + use], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                env={**curl_to(svc.port), "JWT_SECRET": secret, "TOKEN": token})
        # and without the token, the same channel is closed: the token is what opened it
        denied = subprocess.run(["curl", "-s", "-X", "POST", "localhost:8000/channels/room-1/messages", "-d", "{}"],
                                capture_output=True, text=True, timeout=30, env=curl_to(svc.port))
    finally:
        svc.kill()
    published, _, stream = result.stdout.partition("}")
    assert re.fullmatch(r'\{"id":"\d+-\d+(-[0-9a-z]+)?","channel":"room-1"', published), result
    assert "event: relay.hello" in stream and '"channels":["room-1"]' in stream, result
    assert '"code":"unauthorized"' in denied.stdout, denied


def test_examples_import_only_what_the_examples_extra_installs() -> None:
    """`./scripts/run`'s virtualenv installs the package with its `examples` extra: that must cover every import
    of examples/*.py (the standard library and the package itself aside)."""
    import ast
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")
               for req in project["dependencies"] + project["optional-dependencies"]["examples"]}
    assert '"[examples]"' in (ROOT / "scripts" / "run").read_text()
    providers = importlib.metadata.packages_distributions()
    for example in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(example.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("service", "__future__"):
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
                assert dists & allowed, f"{example.name} imports {top} ({dists or 'not installed'}): not in the extra"


def test_security_key_pair_snippet_runs(tmp_path: Path) -> None:
    """docs/security.md's key pair: the openssl commands make a pair, the relay starts with the public half, and a
    token minted with the private one opens the private channel it grants (and nothing opens it without)."""
    snippet = _snippet("openssl genpkey")
    work = tmp_path / "keys"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")  # the snippet names .venv/bin/ from the checkout
    made = subprocess.run(["bash", "-euc", snippet + '\nprintf "%s\\n%s\\n" "$JWT_PUBLIC_KEY" "$TOKEN"'], cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    public_key, tok = made.stdout.split()
    svc = ServiceProcess(tmp_path, env={"JWT_PUBLIC_KEY": str(work / public_key), "PUBLIC_CHANNELS": "chat",
                                        "LOG_LEVEL": "warning"}, name="keypair").start()
    try:
        import httpx

        with httpx.stream("GET", f"{svc.url}/channels/news/events", headers={"Authorization": f"Bearer {tok}"},
                          timeout=10) as stream:
            assert stream.status_code == 200
            assert "event: relay.hello" in next(stream.iter_text())
        assert httpx.get(f"{svc.url}/channels/news/events", timeout=10).status_code == 401
    finally:
        svc.kill()
