"""Query rephrasers: rewrite a search query with explicit aesthetic expectations.

One interface (:class:`Rephraser`), four back ends (``template``, ``local``, ``openai``,
``vllm``), a faithfulness check with a template fallback, and versioned prompt templates.
Importing this package loads no model and no torch; back ends import their heavy parts lazily.
"""

from aligner.rephrase.base import (
    Failed,
    Rephrase,
    Rephraser,
    check_rephrase,
    clean_output,
    content_words,
    count_reasons,
    make_rephraser,
)
from aligner.rephrase.prompt import PromptTemplate, available_prompts, load_prompt
from aligner.rephrase.template import TemplateRephraser

__all__ = ["Failed", "PromptTemplate", "Rephrase", "Rephraser", "TemplateRephraser",
           "available_prompts", "check_rephrase", "clean_output", "content_words",
           "count_reasons", "load_prompt", "make_rephraser"]
