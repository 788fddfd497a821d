"""Question/caption files → records, for training (stage A captions, stage B question–answer pairs) and evaluation.

Formats (``--data-format``; ``auto`` looks at the extension and the first record's keys):

``llava``         LLaVA / LLaVA-Med JSON or JSONL: ``[{"id", "image": "rel/path.jpg", "conversations":
                  [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}]``
                  (LLaVA-Med's alignment captions and instruction data use it)
``pubmedvision``  PubMedVision's JSON: the LLaVA layout with ``"image": [paths]`` plus ``modality`` /
                  ``body_part``; records with more than one image are skipped (one image per prompt here)
``csv``           a CSV with an image column (``image`` or ``identifier``) and either ``caption`` (stage A; the
                  project's metadata CSVs) or ``question`` + ``answer`` (optional ``answer_type`` open/closed,
                  ``question_type``, ``split``, ``modality``)
``vqa-rad``       VQA-RAD's release file ``VQA_RAD Dataset Public.json``: ``image_name``, ``question``,
                  ``answer``, ``answer_type`` (OPEN/CLOSED), ``question_type``, ``phrase_type`` (the test split is
                  ``test_freeform`` + ``test_para``: 451 questions); images in ``VQA_RAD Image Folder/``
``slake``         SLAKE 1.0's ``train.json`` / ``validate.json`` / ``test.json``: ``img_name``, ``question``,
                  ``answer``, ``q_lang``, ``answer_type``, ``content_type``, ``modality``; images in ``imgs/``.
                  Only the English subset (``q_lang == "en"``) is read.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

FORMATS = ("auto", "llava", "pubmedvision", "csv", "vqa-rad", "slake")
SLAKE_SPLITS = {"train.json": "train", "validate.json": "val", "val.json": "val", "test.json": "test"}


class DataFormatError(ValueError):
    """A question/caption file that cannot be read (the message names the file, the record and the fix)."""


@dataclass
class VQARecord:
    """One image with its conversation. ``turns``: [(question, answer)]; the first question holds ``<image>``
    for the LLaVA formats; others get it from the template. ``answer_type``: 'open' / 'closed' / None."""
    image: Path
    turns: List[Tuple[str, str]]
    source: str                      # "file:record" for error messages
    id: str = ""
    answer_type: Optional[str] = None
    question_type: Optional[str] = None
    split: Optional[str] = None
    modality: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    #: the file's questions carry no ``<image>`` (CSV, VQA-RAD, SLAKE): one is put in front of the first question
    #: when prompting; the LLaVA formats must carry it themselves
    adds_placeholder: bool = False

    def prompt_turns(self) -> List[Tuple[str, str]]:
        """The turns as prompted: with the image placeholder in front of the first question where the format has
        none."""
        if not self.adds_placeholder or "<image>" in self.turns[0][0]:
            return list(self.turns)
        return [("<image>\n" + self.turns[0][0], self.turns[0][1])] + list(self.turns[1:])

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]


# ----------------------------------------------------------------------------------------------------
def _load_json_records(path: Path) -> List[Dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: not valid JSON ({error}); fix the file or convert it to one of the "
                              f"formats in docs/vqa.md") from None
    if isinstance(data, dict):  # some releases wrap the list: {"data": [...]} / {"annotations": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFormatError(f"{path}: a JSON object, not a list of records; expected a list (see docs/vqa.md)")
        data = lists[0]
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
        raise DataFormatError(f"{path}: expected a JSON list of records (objects); see docs/vqa.md for the formats")
    return data


def detect_format(path: Union[str, Path]) -> str:
    """The format of a question/caption file (see module doc); DataFormatError when none fits."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; check --data")
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataFormatError(f"{path}: unknown question-file format (extension {path.suffix!r}); use a .json/.jsonl "
                              f"(LLaVA, PubMedVision, VQA-RAD, SLAKE) or .csv file, or pass --data-format")
    records = _load_json_records(path)
    keys = set(records[0]) if records else set()
    if "conversations" in keys:
        return "pubmedvision" if isinstance(records[0].get("image"), list) else "llava"
    if "phrase_type" in keys or {"image_name", "answer_type"} <= keys:
        return "vqa-rad"
    if "q_lang" in keys or "img_name" in keys:
        return "slake"
    raise DataFormatError(f"{path}: unknown question-file format (first record's keys: {sorted(keys)}); expected "
                          f"LLaVA/PubMedVision ('conversations'), VQA-RAD ('image_name', 'phrase_type'), SLAKE "
                          f"('img_name', 'q_lang') or a CSV; convert it or pass --data-format (docs/vqa.md)")


def read_records(path: Union[str, Path], data_format: str = "auto", image_root: Union[str, Path, None] = None,
                 split: Optional[str] = None, captions: bool = False) -> List[VQARecord]:
    """Read a question/caption file into records.

    Args:
        path: the file. data_format: one of :data:`FORMATS`.
        image_root: folder relative image paths are resolved against (default: the format's release layout
            next to the file, else the file's folder).
        split: keep only records of this split (VQA-RAD: train/test; SLAKE: from the file name; CSV: its
            ``split`` column). None keeps all.
        captions: read image–caption pairs (stage A): CSVs need ``caption``; the LLaVA formats keep the first
            answer as the caption.

    Raises DataFormatError on an unknown format, missing answers or columns, naming the file and record.
    """
    path = Path(path)
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt not in FORMATS:
        raise DataFormatError(f"{path}: unknown --data-format {data_format!r}; use one of {FORMATS}")
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; check --data")
    reader = {"llava": _read_llava, "pubmedvision": _read_llava, "csv": _read_csv, "vqa-rad": _read_vqa_rad,
              "slake": _read_slake}[fmt]
    records = reader(path, image_root, captions)
    if split is not None:
        records = [r for r in records if r.split == split]
    if not records:
        raise DataFormatError(f"{path}: no records{f' in split {split!r}' if split else ''} (format {fmt}); check "
                              f"the file, --split, or --data-format")
    return records


def _root(path: Path, image_root, release_folder: Optional[str] = None) -> Path:
    if image_root is not None:
        return Path(image_root)
    if release_folder and (path.parent / release_folder).is_dir():
        return path.parent / release_folder
    return path.parent


def _answer_type(value: Any, where: str) -> Optional[str]:
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip().lower()
    if text not in ("open", "closed"):
        raise DataFormatError(f"{where}: answer_type {value!r}; use 'open' or 'closed' (or leave it empty)")
    return text


def _missing_answer(where: str, fix: str) -> DataFormatError:
    return DataFormatError(f"{where}: the answer is missing; {fix}")


def _read_llava(path: Path, image_root, captions: bool) -> List[VQARecord]:
    root = _root(path, image_root)
    records, skipped = [], 0
    for i, item in enumerate(_load_json_records(path)):
        where = f"{path}:record {i}"
        image = item.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                skipped += 1  # several images in one prompt: this model takes one image per prompt
                continue
            image = image[0]
        if not image:
            raise DataFormatError(f"{where}: no 'image'; every record needs one image path")
        conversation = item.get("conversations") or []
        turns = []
        for k in range(0, len(conversation), 2):
            human = conversation[k]
            gpt = conversation[k + 1] if k + 1 < len(conversation) else None
            if human.get("from") not in ("human", "user"):
                raise DataFormatError(f"{where}: turn {k} is from {human.get('from')!r}; conversations alternate "
                                      f"'human' then 'gpt'")
            if gpt is None or gpt.get("from") not in ("gpt", "assistant") or not str(gpt.get("value", "")).strip():
                raise _missing_answer(where, f"turn {k} ('{str(human.get('value', ''))[:40]}') has no 'gpt' reply; "
                                             f"add it or drop the record")
            turns.append((str(human["value"]), str(gpt["value"])))
        if not turns:
            raise _missing_answer(where, "'conversations' is empty; add a human/gpt pair")
        if captions:
            turns = [("<image>\n", turns[0][1])]
        records.append(VQARecord(root / image, turns, where, id=str(item.get("id", i)),
                                 answer_type=_answer_type(item.get("answer_type"), where),
                                 modality=item.get("modality"), split=item.get("split")))
    if skipped:
        print(f"{path}: skipped {skipped} record(s) with several images (one image per prompt is supported)")
    return records


def _read_csv(path: Path, image_root, captions: bool) -> List[VQARecord]:
    root = _root(path, image_root)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = reader.fieldnames or []
        image_column = "image" if "image" in columns else "identifier" if "identifier" in columns else None
        needed = ["caption"] if captions else ["question", "answer"]
        missing = [c for c in needed if c not in columns]
        if image_column is None or missing:
            raise DataFormatError(f"{path}: missing column(s) {(['image'] if image_column is None else []) + missing}; "
                                  f"columns present: {columns}. A caption CSV needs image (or identifier) + caption; a "
                                  f"question CSV image + question + answer")
        records = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}:line {line}"
            if captions:
                caption = (row.get("caption") or "").strip()
                if not caption:
                    raise _missing_answer(where, "the caption is empty; fill it in or delete the row")
                turns = [("<image>\n", caption)]
            else:
                answer = (row.get("answer") or "").strip()
                if not answer:
                    raise _missing_answer(where, "fill in the 'answer' cell or delete the row")
                turns = [(row["question"], answer)]
            records.append(VQARecord(root / row[image_column].strip(), turns, where, id=row.get("id") or str(line),
                                     adds_placeholder=not captions,
                                     answer_type=_answer_type(row.get("answer_type"), where),
                                     question_type=row.get("question_type") or None, split=row.get("split") or None,
                                     modality=row.get("modality") or None))
    return records


def _read_vqa_rad(path: Path, image_root, captions: bool) -> List[VQARecord]:
    root = _root(path, image_root, "VQA_RAD Image Folder")
    records = []
    for i, item in enumerate(_load_json_records(path)):
        where = f"{path}:record {i} (qid {item.get('qid')})"
        answer = str(item.get("answer", "")).strip()
        if not answer:
            raise _missing_answer(where, "VQA-RAD records need 'answer'; use the release file 'VQA_RAD Dataset "
                                         "Public.json'")
        phrase = str(item.get("phrase_type", ""))
        records.append(VQARecord(root / item["image_name"], [(str(item["question"]), answer)], where,
                                 id=str(item.get("qid", i)), answer_type=_answer_type(item.get("answer_type"), where),
                                 question_type=str(item.get("question_type", "")) or None,
                                 split="test" if phrase.startswith("test") else "train", adds_placeholder=True,
                                 extra={"phrase_type": phrase, "organ": item.get("image_organ")}))
    return records


def _read_slake(path: Path, image_root, captions: bool) -> List[VQARecord]:
    root = _root(path, image_root, "imgs")
    split = SLAKE_SPLITS.get(path.name)
    records = []
    for i, item in enumerate(_load_json_records(path)):
        if item.get("q_lang", "en") != "en":
            continue  # the English subset, as LLaVA-Med and the MedITok paper evaluate
        where = f"{path}:record {i} (qid {item.get('qid')})"
        answer = str(item.get("answer", "")).strip()
        if not answer:
            raise _missing_answer(where, "SLAKE records need 'answer'; use the release train/validate/test.json")
        records.append(VQARecord(root / item["img_name"], [(str(item["question"]), answer)], where,
                                 id=str(item.get("qid", i)), answer_type=_answer_type(item.get("answer_type"), where),
                                 question_type=item.get("content_type") or None, split=split, adds_placeholder=True,
                                 modality=item.get("modality")))
    return records


def read_many(paths: Sequence[Union[str, Path]], data_format: str = "auto", image_root=None, split=None,
              captions: bool = False) -> List[VQARecord]:
    """:func:`read_records` over several files, concatenated in order."""
    return [r for p in paths for r in read_records(p, data_format, image_root, split, captions)]


def check_images_exist(records: List[VQARecord], image_root) -> None:
    """DataFormatError listing (up to 3 of) the records whose image file is missing."""
    missing = [r for r in records if not Path(r.image).is_file()]
    if missing:
        shown = "; ".join(f"{r.source}: {r.image}" for r in missing[:3])
        raise DataFormatError(f"{len(missing)} of {len(records)} image file(s) not found ({shown}); check --image-root "
                              f"(now {image_root!r}) or the paths in the file")
