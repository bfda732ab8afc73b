"""arv-wrap report: one self-contained HTML page for one run, from the store's records.

The unit tests build records with Store.insert (a three-level tree, a failed job, a
job that queued then ran, jobs still running and still queued, hostile argv) and
read the HTML back with html.parser. The end-to-end test runs a real pipeline under
arv-wrap, renders its report, and loads it in real headless Chromium: one bar per
job in the rendered DOM, and no request leaving the file.
"""
import datetime
import html.parser
import json
import os
import re
import shutil
import subprocess

import pytest

from arvwrap import report, store
from conftest import need, wrapped, write_tool

T0 = datetime.datetime(2026, 12, 1, 9, 0, 0, tzinfo=datetime.timezone.utc)
NOW = T0 + datetime.timedelta(seconds=120)
HOSTILE = ["</script><script>alert(1)</script>", "\"'&<>", "caf\udcff", "a\nb", "\u202eevil"]
GiB = 1 << 30


def at(seconds):
    stamp = T0 + datetime.timedelta(seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def job(id_, parent, argv, state, created, started=None, ended=None, run="RUN", **fields):
    record = {"id": id_, "run": run, "parent": parent, "kind": "job", "argv": argv,
              "cwd": "/data/project", "backend": "local", "backend_id": f"{4000 + len(id_)}",
              "state": state, "created": at(created),
              "started": at(started) if started is not None else None,
              "ended": at(ended) if ended is not None else None,
              "cpus": 1, "memory": 2 * GiB, "time_limit": 3600, "host": "node1"}
    if started is not None:
        record["queued_seconds"] = started - created
    record.update(fields)
    return record


# run -> snakemake (nested pipeline job) -> tool jobs; one more tool straight under the run
RECORDS = [
    {"id": "OLDRUN", "run": "OLDRUN", "parent": None, "kind": "run", "argv": ["old.sh"],
     "cwd": "/old", "backend": "local", "state": "exited", "exit_status": 0,
     "created": "2026-11-30T08:00:00.000Z", "started": "2026-11-30T08:00:00.000Z",
     "ended": "2026-11-30T08:01:00.000Z", "cpus": 0, "memory": 0},
    job("OLDJOB", "OLDRUN", ["gzip", "old.txt"], "exited", -86400, -86399, -86390,
        run="OLDRUN", exit_status=0),
    {"id": "RUN", "run": "RUN", "parent": None, "kind": "run",
     "argv": ["snakemake", "-j", "4"], "cwd": "/data/project", "backend": "local",
     "state": "running", "created": at(0), "started": at(0), "cpus": 0, "memory": 0},
    job("PIPE", "RUN", ["snakemake", "--snakefile", "inner.smk"], "running", 1, 1.5,
        cpus=0.1, memory=GiB // 2),
    job("ALIGN", "PIPE", ["bwa", "mem", "-t", "4", "/ref/ref.fa", "r1.fq"], "exited", 2, 2.2, 32,
        exit_status=0, cpus=4, memory=8 * GiB, cpu_seconds=96.0, max_rss=3 * GiB),
    job("SORT", "PIPE", ["samtools", "sort", "-o", "out.bam"], "exited", 3, 3.1, 10,
        exit_status=2, cpu_seconds=5.0, max_rss=GiB),
    job("CALL", "PIPE", ["bcftools", "call", "-mv"], "failed", 11, None, 11.5,
        reason="backend error: sbatch: error: invalid partition <long>"),
    job("WAITED", "PIPE", ["bwa", "mem", "-t", "2", "ref.fa", "r2.fq"], "running", 33, 63,
        cpus=2, memory=8 * GiB),
    job("QUEUED", "PIPE", ["bwa", "index", "ref.fa"], "queued", 100),
    job("EVIL", "RUN", ["/opt/bin/<img src=x onerror=alert(2)>", *HOSTILE], "signaled", 5, 5, 6,
        signal=9, reason="<b>killed</b> by \"arv-wrap cancel\"", cpu_seconds=0.5, max_rss=1000),
]


class Page(html.parser.HTMLParser):
    """The elements of a page: [tag, attrs dict, text inside], in document order."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elements, self.open = [], []
        self.feed(text)
        self.close()
        while self.open:
            self._finish(self.open.pop())

    @staticmethod
    def _finish(element):
        element[2] = "".join(element[2])

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), []]
        self.elements.append(element)
        if tag in ("meta", "br", "img", "link", "input", "hr"):
            element[2] = ""
        else:
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open:
            element = self.open.pop()
            self._finish(element)
            if element[0] == tag:
                break

    def handle_data(self, data):
        for element in self.open:
            element[2].append(data)

    def by_class(self, name):
        return [e for e in self.elements if name in e[1].get("class", "").split()]

    def by_id(self, id_):
        return [e for e in self.elements if e[1].get("id") == id_][0]


WHITELIST = """tools:
  - name: bwa
    when: {subcommand: [mem, index]}
  - name: samtools
    when: {subcommand: [sort]}
  - name: snakemake
    nested: true
"""
RULES = {"ALIGN": 2, "WAITED": 2, "QUEUED": 2, "SORT": 4, "PIPE": 6}   # job -> rule's line


@pytest.fixture
def records(tmp_path):
    """RECORDS in a real store, each job naming the whitelist rule that matched it."""
    rules = tmp_path / "w.yaml"
    rules.write_text(WHITELIST)
    db = store.Store(str(tmp_path / "state"))
    for record in RECORDS:
        line = RULES.get(record["id"])
        db.insert({**record, "rule": f"{rules}:{line}"} if line else record)
    return db.list()


@pytest.fixture
def page(records):
    return Page(report.render(records, now=NOW)), report.render(records, now=NOW)


def bar_of(page, job_id):
    [bar] = [b for b in page.by_class("bar") if b[1]["href"] == f"#job-{job_id}"]
    return bar


def geometry(element):
    style = dict(part.split(":") for part in element[1]["style"].split(";"))
    return {k: float(v.rstrip("%")) for k, v in style.items()}


def test_default_is_the_newest_run_and_one_bar_per_job(page):
    page, text = page
    bars = page.by_class("bar")
    ids = sorted(b[1]["href"] for b in bars)
    assert ids == sorted(f"#job-{i}" for i in
                         ("PIPE", "ALIGN", "SORT", "CALL", "WAITED", "QUEUED", "EVIL"))
    assert "OLDJOB" not in text and "old.sh" not in text
    # the run itself is drawn as a span, not a bar
    assert len(page.by_class("span")) == 1


def test_explicit_run_and_prefix_and_missing(records, tmp_path):
    out = tmp_path / "old.html"
    assert report.write(records, str(out), run="OLDR") == "OLDRUN"
    old = Page(out.read_text())
    assert [b[1]["href"] for b in old.by_class("bar")] == ["#job-OLDJOB"]
    with pytest.raises(report.NoRun, match="no record NOPE"):
        report.render(records, run="NOPE")
    with pytest.raises(report.NoRun, match="names 2 records"):
        report.render(records, run="OLD")
    with pytest.raises(report.NoRun, match="no run"):
        report.render([r for r in records if r["kind"] == "job"])


def test_a_job_id_reports_its_subtree(records):
    page = Page(report.render(records, run="PIPE", now=NOW))
    assert sorted(b[1]["href"] for b in page.by_class("bar")) == sorted(
        f"#job-{i}" for i in ("ALIGN", "SORT", "CALL", "WAITED", "QUEUED"))


def test_failures_come_first_with_their_reason(page):
    page, text = page
    sections = [e for e in page.elements if e[0] == "section"]
    assert sections[0][1]["id"] == "failures"
    rows = page.by_class("failure")
    # signaled, non-zero exit and failed, in the order they ended; running, queued and 0 are not
    links = [e[1]["href"] for e in page.elements
             if e[0] == "a" and page.elements.index(e) > page.elements.index(page.by_id("failures"))
             and page.elements.index(e) < page.elements.index(page.by_id("timeline"))]
    assert links == ["#job-EVIL", "#job-SORT", "#job-CALL"] and len(rows) == 3
    failures = page.by_id("failures")[2]
    assert "exited 2" in failures and "signaled SIGKILL" in failures and "failed" in failures
    assert "backend error: sbatch: error: invalid partition <long>" in failures
    assert '<b>killed</b> by "arv-wrap cancel"' in failures      # as text, not markup
    assert text.index('id="failures"') < text.index('id="timeline"') < text.index('id="tree"')


def test_no_failure_says_so(records):
    ok = [r for r in records if r["id"] in ("RUN", "ALIGN")]
    page = Page(report.render(ok, now=NOW))
    assert "No job failed." in page.by_id("failures")[2]
    assert page.by_class("failure") == []


def test_hostile_argv_and_reason_render_as_text(page):
    page, text = page
    text.encode("utf-8")                            # no lone surrogate reaches the file
    assert "<script" not in text.lower()            # the page has no script at all
    assert not [e for e in page.elements if e[0] in ("script", "img", "iframe", "object")]
    assert "<b>killed" not in text and "&lt;b&gt;killed&lt;/b&gt;" in text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text
    tree_row = page.by_id("job-EVIL")[2]
    assert "</script><script>alert(1)</script>" in tree_row
    assert "<img src=x onerror=alert(2)>" in tree_row
    assert "caf\\xff" in tree_row and "$'a\\nb'" in tree_row       # bytes and controls shown
    assert "\u202e" not in text and "$'\\u202eevil'" in tree_row     # no bidi override either
    bar = bar_of(page, "EVIL")
    assert "</script><script>alert(1)</script>" in bar[1]["title"]
    assert "'\"'\"'&<>'" in bar[1]["title"]               # shell-quoted, quotes kept
    # nothing from the records in an attribute other than the escaped title, href and id
    assert all(set(e[1]) <= {"class", "style", "title", "href", "id", "colspan", "lang",
                             "charset", "http-equiv", "content", "name"} for e in page.elements)


def test_timeline_geometry_queued_running_and_now(page):
    page, _ = page
    span = 120.0                                          # T0 .. NOW
    align = geometry(bar_of(page, "ALIGN"))
    assert align["left"] == pytest.approx(2 / span * 100, abs=0.01)
    assert align["width"] == pytest.approx(30 / span * 100, abs=0.01)
    waited = bar_of(page, "WAITED")
    assert "open" in waited[1]["class"] and "s-running" in waited[1]["class"]
    g = geometry(waited)
    assert g["left"] + g["width"] == pytest.approx(100, abs=0.01)      # drawn up to now
    index = page.elements.index(waited)
    q = page.elements[index + 1]
    assert q[1]["class"] == "q"
    assert geometry(q)["width"] == pytest.approx(30 / 87 * 100, abs=0.01)  # 30 s of 87 queued
    still = bar_of(page, "QUEUED")
    assert "s-queued" in still[1]["class"] and "open" in still[1]["class"]
    g = geometry(still)
    assert g["left"] + g["width"] == pytest.approx(100, abs=0.01)
    failed = bar_of(page, "CALL")                       # failed before it started
    assert "s-failed" in failed[1]["class"] and "open" not in failed[1]["class"]
    assert "s-nonzero" in bar_of(page, "SORT")[1]["class"]
    assert "s-exited" in bar_of(page, "ALIGN")[1]["class"]


def test_bars_are_grouped_by_tool(page):
    page, _ = page
    groups = {}
    for element in page.elements:
        if "gname" in element[1].get("class", ""):
            name = element[1].get("title")
        elif "bar" in element[1].get("class", "").split():
            groups.setdefault(name, []).append(element[1]["href"][5:])
    # a subcommand counts when the job's whitelist rule matched on it (`when: subcommand`)
    assert groups == {"snakemake": ["PIPE"], "bwa mem": ["ALIGN", "WAITED"],
                      "samtools sort": ["SORT"], "<img src=x onerror=alert(2)>": ["EVIL"],
                      "bcftools": ["CALL"], "bwa index": ["QUEUED"]}
    assert list(groups) == ["snakemake", "bwa mem", "samtools sort", "<img src=x onerror=alert(2)>",
                            "bcftools", "bwa index"]               # by first arrival
    labels = [e[2] for e in page.by_class("label") if "mono" in e[1]["class"]]
    assert "-t 4 ref.fa r1.fq" in labels                 # the arguments, paths shortened


def test_many_jobs_of_a_tool_share_rows(tmp_path):
    run = {"id": "R", "run": "R", "kind": "run", "argv": ["make", "-j2"], "state": "exited",
           "exit_status": 0, "created": at(0), "started": at(0), "ended": at(100)}
    # 20 gzips two at a time, 5 s each: two rows of ten bars
    many = [job(f"G{i:02d}", "R", ["gzip", f"part{i}"], "exited", i // 2 * 5, i // 2 * 5, i // 2 * 5 + 4.5,
                run="R", exit_status=0) for i in range(20)]
    page = Page(report.render([run, *many], now=NOW))
    assert len(page.by_class("bar")) == 20
    [group] = [e for e in page.by_class("grp") if "gzip" in e[2]]      # the last group
    rows = [e for e in page.elements[page.elements.index(group):] if e[1].get("class") == "row"]
    assert len(rows) == 2 and [r[2] for r in page.by_class("label") if r[2]] == []


def test_without_the_whitelist_a_tool_is_its_program(records, tmp_path):
    os.unlink(tmp_path / "w.yaml")
    page = Page(report.render(records, now=NOW))
    names = [e[1]["title"] for e in page.by_class("gname") if "title" in e[1]]
    assert names == ["snakemake", "bwa", "samtools", "<img src=x onerror=alert(2)>", "bcftools"]


def test_tooltip_holds_argv_and_resources(page):
    page, _ = page
    title = bar_of(page, "ALIGN")[1]["title"]
    assert title.split("\n") == [
        "bwa mem -t 4 /ref/ref.fa r1.fq", "", "exited 0", "job ALIGN · local 4005",
        "asked: 4 CPU, 8 GiB, 1h 00m limit",
        "used: 1m 36s CPU, 3 GiB peak RSS, CPU efficiency 81%",
        "arrived at +2 s, queued 0.2 s, ran 29.8 s"]
    evil = bar_of(page, "EVIL")[1]["title"].split("\n")
    assert len(evil) == 7 and evil[2] == 'signaled SIGKILL — <b>killed</b> by "arv-wrap cancel"'
    assert "still queued" in bar_of(page, "QUEUED")[1]["title"]
    assert "asked: 4 CPU, 8 GiB" in title and "1h 00m limit" in title
    assert "used: 1m 36s CPU, 3 GiB peak RSS, CPU efficiency 81%" in title
    assert "job ALIGN · local 4005" in title


def test_tree_three_levels_with_resources(page):
    page, text = page
    order = [e[1]["id"] for e in page.elements if e[0] == "tr" and e[1].get("id", "").startswith("job-")]
    # depth first, children by arrival: the pipeline's subtree, then the job the run made itself
    assert order == ["job-RUN", "job-PIPE", "job-ALIGN", "job-SORT", "job-CALL", "job-WAITED",
                     "job-QUEUED", "job-EVIL"]
    pipe = page.by_id("job-PIPE")[2]
    assert "5 below" in pipe and "0.1" in pipe and "512 MiB" in pipe
    align = page.by_id("job-ALIGN")[2]
    for cell in ("exited 0", "local", "4005", "4", "8 GiB", "1m 36s", "3 GiB", "81%", "0.2 s", "29.8 s"):
        assert cell in align, cell
    # indentation: a tool job under the pipeline is one guide deeper than the pipeline
    assert page.by_id("job-ALIGN")[2].count("│") == 1 and page.by_id("job-PIPE")[2].count("│") == 0
    assert "running" in page.by_id("job-WAITED")[2] and "57.0 s so far" in page.by_id("job-WAITED")[2]


def test_per_tool_cpu_and_memory_with_efficiency(page):
    page, _ = page
    section = page.by_id("tools")
    rows = [e for e in page.elements[page.elements.index(section):] if e[0] == "tr"][1:]
    first = rows[0][2]
    assert first.startswith("bwa mem")                    # most CPU time first
    assert "1m 36s" in first and "81%" in first and "3 GiB" in first and "8 GiB" in first
    assert "38%" in first                                  # peak RSS / memory asked
    samtools = [r[2] for r in rows if r[2].startswith("samtools sort")][0]
    assert "5 s" in samtools and "72%" in samtools         # 5 / (6.9 s x 1 CPU)


def assert_self_contained(page, text):
    """Nothing in the page can make the browser fetch anything: no URL, no element or
    attribute that loads, no url() or @import in the CSS, and a CSP that forbids it all."""
    assert not re.search(r"https?:|ftp:|wss?:", text, re.I)
    tags = {e[0] for e in page.elements}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "main", "header", "section",
                    "footer", "h1", "h2", "div", "span", "p", "dl", "dt", "dd", "table", "thead",
                    "tbody", "tr", "th", "td", "a", "b", "i", "small", "details", "summary"}, tags
    assert all(e[1]["href"].startswith("#job-") for e in page.elements if "href" in e[1])
    assert not [e for e in page.elements
                if {"src", "srcset", "action", "data", "poster", "background"} & set(e[1])]
    [style] = [e[2] for e in page.elements if e[0] == "style"]
    assert "url(" not in style and "@import" not in style and "//" not in style
    assert not [e for e in page.elements if "url(" in e[1].get("style", "")]
    [csp] = [e[1]["content"] for e in page.elements
             if e[1].get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'none'" in csp


def test_self_contained(page):
    assert_self_contained(*page)


def test_write_is_atomic_and_handles_odd_records(tmp_path):
    # missing fields, unknown state, bad stamps, a parent that is not recorded, a cycle
    odd = [
        {"id": "R", "run": "R", "kind": "run", "argv": [], "state": "weird", "created": "nonsense"},
        {"id": "A", "run": "R", "parent": "GONE", "kind": "job", "argv": ["x"], "state": None},
        {"id": "B", "run": "R", "parent": "C", "kind": "job", "argv": ["y"], "state": "exited",
         "exit_status": 0, "created": at(1), "started": at(0.5), "ended": at(0.2)},
        {"id": "C", "run": "R", "parent": "B", "kind": "job", "argv": ["z"], "state": "running",
         "cpus": "lots", "memory": None},
    ]
    out = tmp_path / "r.html"
    out.write_text("old")
    assert report.write(odd, str(out), now=NOW) == "R"
    page = Page(out.read_text())
    assert sorted(b[1]["href"] for b in page.by_class("bar")) == ["#job-A", "#job-B", "#job-C"]
    assert "not recorded" in page.by_id("job-A")[2]
    assert os.listdir(tmp_path) == ["r.html"]


def test_any_depth():
    chain = [{"id": "R", "run": "R", "kind": "run", "argv": ["driver"], "state": "running",
              "created": at(0), "started": at(0)}]
    for i in range(3000):                      # deeper than Python's recursion limit
        chain.append(job(f"N{i}", chain[-1]["id"], ["driver"], "running", i / 100, i / 100, run="R"))
    page = Page(report.render(chain, now=NOW))
    assert len(page.by_class("bar")) == 3000
    assert "2999 below" in page.by_id("job-N0")[2] and "1 below" in page.by_id("job-N2998")[2]
    assert page.by_id("job-N3")[2].count("│") == 3                 # one guide per level
    assert page.by_id("job-N2999")[2].count("│") == 10 and "level 3000" in page.by_id("job-N2999")[2]


def test_write_to_stdout(records, capfdbinary):
    assert report.write(records, "-", now=NOW) == "RUN"
    out = capfdbinary.readouterr().out
    assert out.startswith(b"<!DOCTYPE html>") and out.count(b'class="bar ') == 7


# ------------------------------------------------------------------ in real Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium(page, tmp_path, *extra):
    """Load page (a path) in headless Chromium: (dumped DOM, URLs of the requests the page made)."""
    profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
    netlog = tmp_path / f"{profile.name}.netlog.json"
    done = subprocess.run([shutil.which("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           f"--log-net-log={netlog}", *extra, "--dump-dom", f"file://{page}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    # Requests the browser makes on its own behalf (time, update checks) have no
    # origin; those a page makes carry the page's origin ("null" for a file).
    requests = [e["params"] for e in log["events"]
                if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})]
    from_page = [r["url"] for r in requests if r.get("initiator") != "not an origin"]
    return done.stdout.decode(), from_page


def test_report_of_a_real_run_in_chromium(tools, base_env, whitelist_file, tmp_path):
    need("chromium")           # skipped when missing, except on CI (CI=true) where it fails
    write_tool(tools, "prep", "sleep 0.2\n")
    write_tool(tools, "align", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done\n")
    write_tool(tools, "call", "echo calling failed >&2; exit 3\n")
    write_tool(tools, "pipeline", "align one & align two; wait\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        "defaults: {cpus: 1, memory: 100M}\n"
        "tools:\n  - name: prep\n  - name: align\n  - name: call\n"
        "  - name: pipeline\n    nested: true\n    cpus: 0.1\n")
    # the pipeline (0.1, lent to its first align) + 1 + 1 > 1.5: the aligns take turns
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1.5"
    done = wrapped(base_env, "prep; pipeline; call '</script><script>alert(1)</script>' || true; "
                             "align \"$(printf 'caf\\377')\"")
    assert done.returncode == 0, done.stderr
    records = store.Store(base_env["ARV_WRAP_STATE_DIR"]).list()
    [run] = [r for r in records if r["kind"] == "run"]
    jobs = [r for r in records if r["kind"] == "job"]
    assert len(jobs) == 6 and all(r["run"] == run["id"] for r in jobs)
    [pipeline] = [r for r in jobs if r["argv"][0] == "pipeline"]
    inner = [r for r in jobs if r["parent"] == pipeline["id"]]
    assert sorted(r["argv"][1] for r in inner) == ["one", "two"]          # run -> pipeline -> align
    waited = max(inner, key=lambda r: r["queued_seconds"])
    assert waited["queued_seconds"] > 0.05                                # queued, then ran
    out = tmp_path / "report.html"
    assert report.write(records, str(out)) == run["id"]

    dom, from_page = chromium(out, tmp_path)
    page = Page(dom)
    bars = page.by_class("bar")
    assert sorted(b[1]["href"] for b in bars) == sorted(f"#job-{r['id']}" for r in jobs)
    waited_bar = bar_of(page, waited["id"])
    assert geometry(page.elements[page.elements.index(waited_bar) + 1])["width"] > 10
    assert_self_contained(page, dom)
    [failure] = page.by_class("failure")
    assert "call" in failure[2] and "exited 3" in failure[2]
    assert "</script><script>alert(1)</script>" in failure[2]
    assert any("caf\\xff" in e[2] for e in page.by_class("cmdcell"))
    assert from_page == []

    # the check sees a page that does fetch something (so an empty list above means something)
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><img src="http://img.example.invalid/x.png">')
    _, fetched = chromium(control, tmp_path)
    assert fetched == ["http://img.example.invalid/x.png"]
