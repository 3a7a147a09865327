"""CTC decoding: greedy, beam search with an n-gram LM, forced alignment, subtitle segments.

Everything works on one utterance's scores ``(time, vocab)`` (logits or log-probabilities);
``*_batch`` helpers loop over ``(batch, time, vocab)`` with lengths.
"""

from w2v2.decoding.alignment import align_text, align_words, ctc_forced_align, min_frames
from w2v2.decoding.beam import BeamSearchDecoder, ctc_labels, decoding_windows, join_decoded
from w2v2.decoding.greedy import greedy_decode, greedy_decode_batch, greedy_decode_path
from w2v2.decoding.ngram import build_ngram_lm
from w2v2.decoding.segments import segment_words
from w2v2.decoding.types import Char, DecodedText, Word, ctc_collapse

__all__ = [
    "BeamSearchDecoder",
    "Char",
    "DecodedText",
    "Word",
    "align_text",
    "align_words",
    "build_ngram_lm",
    "ctc_collapse",
    "ctc_forced_align",
    "ctc_labels",
    "decoding_windows",
    "greedy_decode",
    "greedy_decode_batch",
    "greedy_decode_path",
    "join_decoded",
    "min_frames",
    "segment_words",
]
