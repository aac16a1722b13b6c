"""The output row contract and the status codes rows can carry."""
from __future__ import annotations

import pyarrow as pa

# Image formats (PIL names) that are opened by default (image.formats): what a VLM dataset uses.
# JPEG also opens MPO camera files; GIF and WebP give their first frame.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

OK = "ok"
# Failures before generation: one error row for the input row.
BAD_RECORD = "bad_record"            # malformed JSONL line, not an object, unusable field values
MISSING_COLUMN = "missing_column"    # the shard has no image column
NO_IMAGE = "no_image"                # null / empty image reference
TOO_MANY_IMAGES = "too_many_images"  # more images than engine.max_images_per_prompt
PATH_NOT_ALLOWED = "path_not_allowed"  # outside input.allowed_roots or a scheme not allowed
MISSING_IMAGE = "missing_image"      # the file / object does not exist
BAD_IMAGE = "bad_image"              # exists but cannot be decoded as an image
IMAGE_TOO_LARGE = "image_too_large"  # byte size or declared pixel count over the limit
DUPLICATE_ROW_ID = "duplicate_row_id"  # input.id_column value already used by another row
BAD_CONCEPT = "bad_concept"          # the row's concept cannot get a usable tag
# Failures of one QA row.
ENGINE_ERROR = "engine_error"
INVALID_OUTPUT = "invalid_output"
BAD_REFERENCE = "bad_reference_image"  # a reference image shown in the prompt cannot be read or decoded

# What a QA row is (personalization/items.py): a question about one concept, a recognition pair
# (its answer built from its label), a question naming every concept of a multi-concept image, a
# text-only question about a concept (answered looking at its reference images).
QA_TYPES = ("open", "recognition", "multi", "text")

# Our columns, in order, with fixed types so every output file has one schema.
OUTPUT_FIELDS = [
    pa.field("row_id", pa.string()),
    pa.field("qa_index", pa.int32()),
    pa.field("qa_type", pa.string()),           # one of QA_TYPES
    pa.field("concept", pa.string()),           # the concept the question asks about
    pa.field("tag", pa.string()),
    pa.field("image_concept", pa.string()),     # the concept the image shows (differs on "No" pairs; '+'-joined
                                                # names for a multi-concept image)
    pa.field("image_concepts", pa.list_(pa.string())),  # every concept the image shows
    pa.field("reference_images", pa.list_(pa.string())),  # shown before the query image (RAP), in order
    pa.field("subject_type", pa.string()),
    pa.field("subject_type_source", pa.string()),  # one of SUBJECT_SOURCES
    pa.field("question", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("pers_qa", pa.string()),
    pa.field("template_id", pa.string()),
    pa.field("label", pa.string()),             # recognition: yes | no (the truth, by construction)
    pa.field("negative_concept", pa.string()),  # a "No" pair: the concept it asks about (not in the image)
    pa.field("negative_kind", pa.string()),     # ... and why it was chosen: same_class_phrase | same_type |
                                                # similar | random
    pa.field("model_label", pa.string()),       # recognition_check: what the VLM answered
    pa.field("language", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("model", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("prompt_version", pa.string()),
    pa.field("num_input_tokens", pa.int32()),
    pa.field("num_output_tokens", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_s", pa.float32()),
]
OUTPUT_COLUMNS = [f.name for f in OUTPUT_FIELDS]
# What decided a row's subject type (personalization/subjects.py): the input's subject-type column,
# the concept's configured type, the VLM, prompt.default_subject_type, or nothing (only the families
# valid for every type are asked).
SUBJECT_SOURCES = ("column", "concept", "detected", "default", "unknown")
# Working columns that travel between stages and never reach the output.
INTERNAL_PREFIX = "_pq_"
PIXELS = "_pq_pixels"        # list<large_binary>: raw RGB uint8, row-major
SHAPES = "_pq_shapes"        # list<list<int32>>: [height, width] per image
ITEMS = "_pq_items"          # list<struct>: the row's QA items (personalization/items.py ITEM_TYPE)
CLASS_PHRASE = "_pq_class_phrase"  # the concept's class phrase, if registered
DETECT = "_pq_detect"        # bool: the VLM decides the row's subject type (generate stage)
REF_IMAGES = "_pq_ref_images"      # list<string>: reference images shown before the query image
REF_CAPTIONS = "_pq_ref_captions"  # list<string>: their captions ("This is <chelsea>.")
CONCEPTS = "_pq_concepts"    # list<string>: the row's concept names from input.concept_column (a name or a list)
TEXT_ROW = "_pq_text_row"    # bool: a concept row (io/concept_rows.py): text-only questions
SOURCE = "_pq_source"        # shard path the row came from (travels to the writer: commit units)
POSITION = "_pq_position"    # the row's position in its shard (resume state: done ranges)
REPLACES = "_pq_replaces"    # --retry-errors: the commit record whose error row this row replaces
# Travel with the row to the writer (generate keeps them; the writer drops them).
WRITER_COLUMNS = (SOURCE, POSITION, REPLACES)


def input_column_name(name: str) -> str:
    """Input columns that clash with ours are kept under 'input_<name>' instead of being lost."""
    if name in OUTPUT_COLUMNS or name.startswith(INTERNAL_PREFIX):
        return f"input_{name}"
    return name
