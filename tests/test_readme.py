"""The README's links and the repository files it names exist."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors for the `##` and `###` headings of `text`: lower case,
  punctuation but hyphens dropped, spaces as hyphens."""
  anchors = set()
  for heading in re.findall(r"^#{2,3} (.+)$", text, re.M):
    words = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    anchors.add(words.replace(" ", "-"))
  return anchors


def test_heading_anchors_follow_github():
  assert heading_anchors("## Checkpoints, resume and preemption\n"
                         "### The science suite: the paper's claims\n") == {
                             "checkpoints-resume-and-preemption",
                             "the-science-suite-the-papers-claims"}


def test_every_link_inside_the_readme_names_a_heading():
  text = readme()
  links = re.findall(r"\]\(#([^)]+)\)", text)
  assert links, "the README links none of its sections"
  assert sorted(set(links) - heading_anchors(text)) == []


def test_every_repository_file_the_readme_names_exists():
  # Paths under the project's folders; `X` is the README's placeholder.
  pattern = (r"\b((?:benchmarks|tests|trainer|models|input_pipeline|configs|"
             r"docs)/[\w./-]+?\.(?:py|sh|md|txtpb|txt|json\.gz|json))\b")
  named = {p for p in re.findall(pattern, readme()) if "/X." not in p}
  assert len(named) > 30
  assert sorted(p for p in named
                if not os.path.exists(os.path.join(ROOT, p))) == []
