"""The data contract: every Arrow schema the jobs read or write, defined here and only here."""

from __future__ import annotations

import pyarrow as pa

ENTITY = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),
        pa.field("start", pa.int32()),
        pa.field("end", pa.int32()),
    ]
)

# Input samples: one (article, image) pair per row.
SAMPLE = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("article_id", pa.string(), nullable=False),
        pa.field("headline", pa.string()),
        pa.field("article", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("image_uri", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
SAMPLE_REQUIRED = ("sample_id", "article_id", "article")

# What the spaCy and MLLM stages add to a sample.
ANNOTATIONS = [
    pa.field("article_entities", pa.list_(ENTITY)),
    pa.field("sentences", pa.list_(pa.string())),
    pa.field("selected_sentence_ids", pa.list_(pa.int32())),
    pa.field("selected_sentences", pa.list_(pa.string())),
    pa.field("selected_entities", pa.list_(ENTITY)),
    pa.field("generated_caption", pa.string()),
    pa.field("caption_entities", pa.list_(ENTITY)),
    pa.field("dropped_answers", pa.int32()),
]

# What caption_corpus writes for every sample it captions.
CAPTION_OUTPUT = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("article_id", pa.string()),
        pa.field("headline", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("caption", pa.string()),
    ]
    + ANNOTATIONS
    + [
        pa.field("mode", pa.string()),
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("source_file", pa.string()),
    ]
)

# One row per sample (or per file, when a whole shard is unreadable) that a job could not process.
# row_group / row locate it in source_file (row_group -1: the whole file; null: an importer's line
# error); retryable rows (a transient fault that outlived its retries) are redone by the next run.
ERROR = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("row_group", pa.int64()),
        pa.field("row", pa.int64()),
        pa.field("retryable", pa.bool_()),
    ]
)

# Bookkeeping columns the batch runner adds to every job's work rows: where the row came from,
# and, once a stage gives up on it, why (error_stage set: later stages pass the row through).
RUNNER_FIELDS = [
    pa.field("source_file", pa.string()),
    pa.field("source_row_group", pa.int64()),
    pa.field("source_row", pa.int64()),
    pa.field("error_stage", pa.string()),
    pa.field("error_reason", pa.string()),
    pa.field("error_retryable", pa.bool_()),
]


def work_schema(fields: list[pa.Field], stages: tuple[str, ...]) -> pa.Schema:
    """A job's work schema: its own columns, the runner's bookkeeping and one busy-seconds column
    per stage (seconds_<stage>, the stage's wall time spread over the rows it served)."""
    names = {f.name for f in RUNNER_FIELDS}
    return pa.schema([pa.field(f.name, f.type) for f in fields if f.name not in names] + RUNNER_FIELDS
                     + [pa.field(f"seconds_{s}", pa.float64()) for s in stages])

# Instruction rows of EAMA's three alignment tasks. `image` is the row's own image, or null when
# the sample's image is stored once in the TASK_IMAGES_DIR folder beside the rows (TASK_IMAGE
# rows, keyed by sample_id): build_alignment_data writes it that way.
TASK_NAMES = ("sentence_selection", "entity_selection", "captioning")
TASK = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)
TASK_IMAGES_DIR = "_images"
TASK_IMAGE = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False)])


# What flows between caption_corpus stages: the sample plus every column a stage adds. A row whose
# error_stage is set is carried through untouched and written to the error output.
CAPTION_STAGES = ("decode", "ner", "mllm", "caption_ner")
# The MLLM engine's token counts of a sample's prompts (summed into the manifest, not written out).
ENGINE_COUNTS = [pa.field("mllm_prompt_tokens", pa.int64()), pa.field("mllm_cached_tokens", pa.int64())]
WORK = work_schema(list(SAMPLE) + [pa.field("image_rgb", pa.binary())] + ANNOTATIONS + ENGINE_COUNTS, CAPTION_STAGES)


# Multimodal NER: one post (tweet) per row, its tokens and BIO tags, its image, and the
# image-text views (ITA) that jobs/image_views.py fills from the image or an importer joins in.
MNER_SAMPLE = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string()), nullable=False),
        pa.field("tags", pa.list_(pa.string())),  # gold BIO tags, one per token (null: unlabelled)
        pa.field("image_id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_uri", pa.string()),
        pa.field("caption", pa.string()),  # view: a caption of the image
        pa.field("ocr", pa.string()),  # view: text read from the image
        pa.field("object_tags", pa.list_(pa.string())),  # view: tags of what the image shows
    ]
)
MNER_REQUIRED = ("sample_id", "tokens")
MNER_VIEWS = ("caption", "ocr", "object_tags")

# What image_views writes: the sample with its view columns filled, and where they came from.
MNER_VIEWS_OUTPUT = pa.schema(
    list(MNER_SAMPLE)
    + [
        pa.field("views_model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("source_file", pa.string()),
    ]
)

# What tag_entities writes: one row per post; entities hold token offsets (start inclusive, end
# exclusive) and the entity's tokens joined by spaces.
MNER_OUTPUT = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string())),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("predicted_tags", pa.list_(pa.string())),
        pa.field("entities", pa.list_(ENTITY)),
        pa.field("view", pa.string()),
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("source_file", pa.string()),
    ]
)


# Multimodal keyphrase posts (import_corpus --format twitter-keyphrase): one post with its image.
KEYPHRASE_SAMPLE = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("post", pa.string(), nullable=False),
        pa.field("keyphrases", pa.list_(pa.string())),  # gold, in the source's order (absent when unlabelled)
        pa.field("image", pa.binary()),
        pa.field("image_uri", pa.string()),
        pa.field("ocr", pa.string()),  # text read off the image
        pa.field("visual_entities", pa.list_(pa.string())),  # entities the image shows (MM-MKP: Baidu API)
        pa.field("image_text_match", pa.float32()),  # P(image and post match), where the source gives one
    ]
)
KEYPHRASE_REQUIRED = ("sample_id", "post")

# What extract_keyphrases writes for every post.
KEYPHRASE_OUTPUT = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("post", pa.string()),
        pa.field("keyphrases", pa.list_(pa.string())),
        pa.field("predicted_keyphrases", pa.list_(pa.string())),  # ranked, best first
        pa.field("predicted_scores", pa.list_(pa.float32())),  # the ranking's scores (log-probabilities)
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("source_file", pa.string()),
    ]
)


# enrich_posts: posts in any of the post contracts above (MNER rows with `tokens`, keyphrase rows
# with `post`, or plain `text`), with or without an image, in one input contract.
POST_TEXT_COLUMNS = ("tokens", "post", "text")  # an input file needs at least one of them
ENRICH_INPUT = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string())),  # the post as tagged words (MNER contract)
        pa.field("post", pa.string()),  # the post as one tokenized string (keyphrase contract)
        pa.field("text", pa.string()),  # the post as raw text, tokenized by enrich_posts
        pa.field("tags", pa.list_(pa.string())),
        pa.field("keyphrases", pa.list_(pa.string())),
        pa.field("image_id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_uri", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("ocr", pa.string()),
        pa.field("object_tags", pa.list_(pa.string())),
        pa.field("visual_entities", pa.list_(pa.string())),
        pa.field("image_text_match", pa.float32()),
    ]
)
ENRICH_REQUIRED = ("sample_id",)

# What enrich_posts writes: one row per post, its views, its entities and its keyphrases, and the
# model behind each (views_model: the view stages; mner_model / keyphrase_model: the exports).
ENRICHED_POST = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string())),
        pa.field("post", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("keyphrases", pa.list_(pa.string())),
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("has_image", pa.bool_()),
        pa.field("caption", pa.string()),
        pa.field("ocr", pa.string()),
        pa.field("object_tags", pa.list_(pa.string())),
        pa.field("visual_entities", pa.list_(pa.string())),
        pa.field("predicted_tags", pa.list_(pa.string())),
        pa.field("entities", pa.list_(ENTITY)),
        pa.field("predicted_keyphrases", pa.list_(pa.string())),
        pa.field("predicted_scores", pa.list_(pa.float32())),
        pa.field("views_model", pa.string()),
        pa.field("mner_model", pa.string()),
        pa.field("keyphrase_model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("source_file", pa.string()),
    ]
)


class SchemaError(ValueError):
    """A shard does not match the contract; the message names the file and the column."""


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected) or pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or pa.types.is_string_view(actual)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual) or pa.types.is_binary_view(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type
        )
    if pa.types.is_struct(expected) and pa.types.is_struct(actual):
        names = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(
            expected.field(i).name in names and _compatible(names[expected.field(i).name], expected.field(i).type)
            for i in range(expected.num_fields)
        )
    return False


def check_schema(
    actual: pa.Schema, expected: pa.Schema, source: str, required: tuple[str, ...] | None = None
) -> None:
    """Raise SchemaError naming `source` and the column if `actual` breaks the contract.

    Columns in `required` (default: the non-nullable fields) must exist; every contract column
    that exists must have a compatible type; extra columns are allowed.
    """
    required = required if required is not None else tuple(f.name for f in expected if not f.nullable)
    for name in required:
        if name not in actual.names:
            raise SchemaError(f"{source}: missing required column '{name}' (has: {', '.join(actual.names)})")
    for field in expected:
        if field.name in actual.names:
            got = actual.field(field.name).type
            if not _compatible(got, field.type):
                raise SchemaError(f"{source}: column '{field.name}' has type {got}, expected {field.type}")


def conform(table: pa.Table, expected: pa.Schema, source: str = "<table>") -> pa.Table:
    """Validate `table`, add missing nullable contract columns as nulls, cast contract columns to
    their canonical types and put them first; extra columns follow untouched."""
    check_schema(table.schema, expected, source)
    columns, fields = [], []
    for field in expected:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                col = col.cast(field.type)
        else:
            col = pa.nulls(table.num_rows, field.type)
        columns.append(col)
        fields.append(pa.field(field.name, field.type))
    for name in table.column_names:
        if name not in expected.names:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def check_sample_images(table: pa.Table, source: str) -> None:
    """A sample table must carry at least one of the image columns."""
    if "image" not in table.column_names and "image_uri" not in table.column_names:
        raise SchemaError(f"{source}: needs an 'image' (bytes) or 'image_uri' (path) column, has neither")


def check_writable(table: pa.Table) -> pa.Table:
    """`table`, after checking what Arrow leaves to the Parquet writer: no null in a non-null
    column (ValueError naming the column)."""
    for field in table.schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"column {field.name!r} is declared non-null but the row has a null")
    return table
