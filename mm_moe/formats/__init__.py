"""The official file formats that both the data pipeline and the evaluation read (below both)."""

from mm_moe.formats.vqa import normalize_answer, read_annotations, read_questions, read_results

__all__ = ["normalize_answer", "read_questions", "read_annotations", "read_results"]
