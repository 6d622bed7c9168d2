"""PDFs as the providers bill them: each page's extracted text plus an image of the page (Gemini: the
image alone, 258 tokens). The mock bills a dense page of text and the largest page image each model
family documents, so a proxy that holds less than a provider could bill is caught."""

from __future__ import annotations

import base64
import io
from typing import Any

import pypdf

PAGE_TEXT_TOKENS = 3_000  # the top of Anthropic's documented 1,500 to 3,000 a page
PAGE_IMAGE_TOKENS = {
    "openai": 2_833 + 6 * 5_667,  # gpt-4o-mini, a letter page at high detail: 6 tiles
    "anthropic": 1_600,
    "gemini": 258 - PAGE_TEXT_TOKENS,  # Gemini bills a page as 258 tokens in all
}


def billed_tokens(body: Any, provider: str) -> int:
    """The tokens of every inline PDF anywhere in a request body."""
    per_page = PAGE_TEXT_TOKENS + PAGE_IMAGE_TOKENS.get(provider, PAGE_IMAGE_TOKENS["openai"])
    return sum(pages(data) * per_page for data in inline_pdfs(body))


def inline_pdfs(value: Any):
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        if not isinstance(value, dict):
            continue
        pending.extend(value.values())
        data_url = value.get("file_data")
        if isinstance(data_url, str) and data_url.startswith("data:application/pdf;base64,"):
            yield data_url.partition(",")[2]
        media_type = value.get("media_type") or value.get("mimeType") or value.get("mime_type")
        if media_type == "application/pdf" and isinstance(value.get("data"), str):
            yield value["data"]


def pages(encoded: str) -> int:
    try:
        return len(pypdf.PdfReader(io.BytesIO(base64.b64decode(encoded))).pages)
    except Exception:
        return 0
