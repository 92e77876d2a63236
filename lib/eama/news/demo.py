"""A deterministic, entity-rich synthetic news corpus: the default input of every job.

Each article reports two or three events (a rally, a match, a concert, a flood, ...), each led by a
person, an organisation and a place, among filler sentences. Each image is drawn to show one of
those events (its scene colour and shape), and its reference caption names the people, organisation
and place of that event. So the caption is learnable only from article + image together: the image
tells which event, the article tells who and where.

Also what jobs/demo.py reports: the fixed-caption baseline, the comparison table and its goals.
"""

from __future__ import annotations

import io
import random
from typing import Iterator

import pyarrow as pa
from PIL import Image, ImageDraw

from eama.engine import schema, storage
from eama.news.evaluation import pct

PEOPLE = [
    "Maria Gonzalez", "James Carter", "Aisha Rahman", "Thomas Becker", "Elena Petrova", "David Kim",
    "Sarah Mitchell", "Carlos Romero", "Hannah Weiss", "Michael O'Brien", "Priya Sharma", "Robert Hughes",
    "Laura Bennett", "Ahmed Hassan", "Julia Novak", "Daniel Foster", "Grace Liu", "Peter Lindqvist",
]
ORGS = [
    "the United Nations", "Google", "the Red Cross", "Harvard University", "the World Bank", "Microsoft",
    "the European Union", "Greenpeace", "the New York Yankees", "Amnesty International", "NASA", "Boeing",
]
PLACES = [
    "Chicago", "Paris", "Berlin", "Tokyo", "Nairobi", "Madrid", "Toronto", "Mumbai", "Sydney", "Cairo",
    "Boston", "Rome", "Seoul", "Lagos",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "June", "August", "October", "November"]

# event -> (verb phrase, background RGB, shape)
EVENTS = {
    "rally": ("led a rally", (200, 40, 40), "circle"),
    "match": ("played a match", (40, 160, 60), "rectangle"),
    "concert": ("gave a concert", (50, 70, 200), "triangle"),
    "flood": ("toured the flood damage", (90, 150, 190), "waves"),
    "summit": ("opened a summit", (120, 80, 160), "diamond"),
    "launch": ("presented a rocket launch", (230, 150, 30), "bar"),
}
NOUN = {"rally": "a rally", "match": "a match", "concert": "a concert", "flood": "the flood damage",
        "summit": "a summit", "launch": "a rocket launch"}
FILLER = [
    "The weather was mild and the streets were quiet.",
    "Officials said about {n} people attended.",
    "The organisers expect a larger crowd next year.",
    "Tickets cost {n} dollars and sold out within hours.",
    "Several roads were closed for most of the day.",
    "Local shops reported busy trade during the afternoon.",
    "It was the {ord} such event this year.",
    "Volunteers handed out water and maps to visitors.",
]
ORDINALS = ["second", "third", "fourth", "fifth"]


def draw_image(event: str, rng: random.Random, size: int = 64) -> bytes:
    """A small picture of `event`: its scene colour and shape, with a little random jitter."""
    _, colour, shape = EVENTS[event]
    jitter = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in colour)
    img = Image.new("RGB", (size, size), jitter)
    d = ImageDraw.Draw(img)
    o = rng.randint(0, 6)
    fg = (245, 245, 245)
    if shape == "circle":
        d.ellipse([12 + o, 12 + o, 50 - o, 50 - o], fill=fg)
    elif shape == "rectangle":
        d.rectangle([8 + o, 20, 56 - o, 44], outline=fg, width=3)
        d.line([32, 20, 32, 44], fill=fg, width=2)
    elif shape == "triangle":
        d.polygon([(32, 8 + o), (10, 54), (54, 54)], fill=fg)
    elif shape == "waves":
        for y in (20, 32, 44):
            d.arc([4, y - 6 + o, 60, y + 6 + o], 0, 180, fill=fg, width=3)
    elif shape == "diamond":
        d.polygon([(32, 6), (58, 32), (32, 58), (6, 32)], outline=fg, width=3)
    else:
        d.rectangle([28, 6 + o, 36, 58], fill=fg)
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _article(rng: random.Random) -> tuple[str, str, list[dict]]:
    """Headline, article text and its events (each with person, org, place)."""
    event_names = rng.sample(sorted(EVENTS), rng.randint(2, 3))
    people = rng.sample(PEOPLE, len(event_names) * 2)
    orgs = rng.sample(ORGS, len(event_names))
    places = rng.sample(PLACES, len(event_names))
    events, sentences = [], []
    for k, name in enumerate(event_names):
        ev = {"event": name, "person": people[2 * k], "partner": people[2 * k + 1], "org": orgs[k],
              "place": places[k]}
        when = f"on {rng.choice(DAYS)}" if rng.random() < 0.5 else f"in {rng.choice(MONTHS)}"
        sentences.append(f"{ev['person']} {EVENTS[name][0]} with {ev['org']} in {ev['place']} {when}.")
        sentences.append(f"{ev['partner']} joined {ev['person'].split()[-1]} there.")
        events.append(ev)
    for _ in range(rng.randint(3, 6)):
        sentences.insert(rng.randint(0, len(sentences)),
                         rng.choice(FILLER).format(n=rng.randint(2, 90) * 100, ord=rng.choice(ORDINALS)))
    headline = f"{events[0]['person']} and {events[1]['person']} draw crowds in {events[0]['place']} and {events[1]['place']}"
    return headline, " ".join(sentences), events


def caption_for(ev: dict) -> str:
    return f"{ev['person']} and {ev['partner']} at {NOUN[ev['event']]} with {ev['org']} in {ev['place']}."


def generate_samples(num_samples: int = 64, seed: int = 0) -> Iterator[dict]:
    """Yield `num_samples` sample dicts (contract columns) deterministically from `seed`."""
    rng = random.Random(seed)
    produced, article_no = 0, 0
    while produced < num_samples:
        headline, article, events = _article(rng)
        article_id = f"demo-{seed}-a{article_no:05d}"
        for img_no, ev in enumerate(rng.sample(events, min(2, len(events)))):
            if produced >= num_samples:
                break
            yield {
                "sample_id": f"{article_id}-{img_no}",
                "article_id": article_id,
                "headline": headline,
                "article": article,
                "image": draw_image(ev["event"], rng),
                "image_uri": None,
                "caption": caption_for(ev),
            }
            produced += 1
        article_no += 1


def write_demo_corpus(output: str, num_samples: int = 64, shard_size: int = 16, seed: int = 0) -> list[str]:
    """Write the demo corpus as Parquet shards `part-00000.parquet`, ... under `output`."""
    rows = list(generate_samples(num_samples, seed))
    paths = []
    for k in range(0, len(rows), shard_size):
        table = pa.Table.from_pylist(rows[k : k + shard_size], schema=schema.SAMPLE)
        path = storage.join(output, f"part-{k // shard_size:05d}.parquet")
        storage.write_table_atomic(table, path, storage.ROW_GROUP_ROWS)
        paths.append(path)
    return paths


def most_frequent_caption(corpus: str) -> str:
    """The training corpus's most frequent reference caption (the first of equals): the 'one fixed
    caption' baseline, which scores what a caption template alone earns."""
    import collections

    captions = [c for f in storage.list_files(corpus) for c in storage.read_table(f, ["caption"]).column(0).to_pylist()]
    return collections.Counter(" ".join((c or "").split()) for c in captions).most_common(1)[0][0]


def write_fixed_captions(corpus: str, caption: str, output: str) -> str:
    """`corpus`'s samples (sample_id, reference caption) with `caption` as every generation, in
    the columns the caption evaluation reads."""
    table = pa.concat_tables([storage.read_table(f, ["sample_id", "caption"]) for f in storage.list_files(corpus)])
    table = table.append_column("generated_caption", pa.array([caption] * table.num_rows, pa.string()))
    path = storage.join(output, "part-00000.parquet")
    storage.write_table_atomic(table, path)
    return output


# ---------------------------------------------------------------- what the demo reports

SCORES = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def headline(report: dict) -> str:
    """One line of a caption report: CIDEr, entity F1 and how many distinct captions."""
    rows, ent = report["rows"], report["entities"]["all"]
    return (f"CIDEr {pct(report['metrics'].get('CIDEr'))}, entity F1 {pct(ent['f1'])}, "
            f"{rows['distinct_generations']} distinct captions of {rows['scored']}")


def comparison(reports: dict[str, dict]) -> str:
    """A markdown table: one column per captioner (caption reports from evaluation.evaluate)."""
    names = list(reports)
    lines = ["| metric (x100) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in SCORES:
        lines.append(f"| {metric} | " + " | ".join(pct(r["metrics"].get(metric)) for r in reports.values()) + " |")
    for key in ("precision", "recall", "f1"):
        lines.append(f"| entity {key} | " + " | ".join(pct(r["entities"]["all"][key]) for r in reports.values()) + " |")
    lines.append("| distinct captions | " + " | ".join(
        f"{r['rows']['distinct_generations']} of {r['rows']['scored']}" for r in reports.values()) + " |")
    return "\n".join(lines)


def goal_lines(reports: dict[str, dict], min_distinct_share: float) -> list[str]:
    """Whether the trained eama model uses its inputs, judged against the baselines; each goal as
    'met' or 'NOT met' with its figures (a goal whose baseline was not run is left out)."""
    eama = reports["eama, trained"]
    f1 = {name: r["entities"]["all"]["f1"] for name, r in reports.items()}
    distinct, scored = eama["rows"]["distinct_generations"], eama["rows"]["scored"]
    goals = [(distinct >= min_distinct_share * scored,
              f"distinct captions: {distinct} of {scored} (goal >= {min_distinct_share * scored:.0f})")]
    if "fixed caption" in f1:
        goals.append((f1["eama, trained"] >= 2 * f1["fixed caption"],
                      f"entity F1 {pct(f1['eama, trained'])} vs the fixed caption's {pct(f1['fixed caption'])} "
                      "(goal: at least twice it)"))
    if "plain (Base), trained" in f1:
        goals.append((f1["eama, trained"] > f1["plain (Base), trained"],
                      f"entity F1 {pct(f1['eama, trained'])} vs plain (Base) trained the same way "
                      f"{pct(f1['plain (Base), trained'])} (goal: above it)"))
    return [f"{'met    ' if ok else 'NOT met'}  {text}" for ok, text in goals] + (
        [] if all(ok for ok, _ in goals) else
        ["At this scale the goals above marked NOT met were not reached: read the table as the loop "
         "running end to end, not as evidence that the method works."])
