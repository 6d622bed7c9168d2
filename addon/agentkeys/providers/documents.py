"""Documents sent inline (a PDF, a text file): one rule, whatever the wire format.

    a PDF            its page count × (one page image + PDF_PAGE_TEXT_TOKENS of text)
    a text document  its UTF-8 bytes
    anything else    (a file id, a URL, another binary type, a PDF that cannot be read): the provider
                     alone sees it, so the caller holds the model's whole context window

Every provider bills a PDF page as its extracted text plus an image of the page (Gemini as the image
alone), so a page is held as the format's image allowance plus a page of text far denser than any
provider documents (Anthropic: 1,500 to 3,000 text tokens a page).
"""

import base64
import binascii
import io
import logging

import pypdf

# A page of text held for each PDF page: several times the densest page providers document.
PDF_PAGE_TEXT_TOKENS = 8_000
PDF_MEDIA_TYPE = "application/pdf"
TEXT_MEDIA_TYPES = ("text/plain", "text/markdown", "text/csv", "text/html")

# pypdf warns on every oddity of a file it still reads; an agent's PDF is not the proxy's log's business.
logging.getLogger("pypdf").setLevel(logging.ERROR)


def inline_document_tokens(media_type: str | None, encoded: str, image_tokens: int) -> int | None:
    """A bound on the input tokens of a base64 document; None when only the provider can bound it."""
    media_type = (media_type or "").split(";")[0].strip().lower()
    if media_type != PDF_MEDIA_TYPE and media_type not in TEXT_MEDIA_TYPES:
        return None
    try:
        data = base64.b64decode(encoded, validate=False)
    except (binascii.Error, ValueError):
        return None
    if media_type in TEXT_MEDIA_TYPES:
        return len(data)
    pages = pdf_pages(data)
    return None if pages is None else pages * (image_tokens + PDF_PAGE_TEXT_TOKENS)


def data_url_tokens(url: str, image_tokens: int) -> int | None:
    """`data:application/pdf;base64,…` (OpenAI's `file_data`) as `inline_document_tokens` reads it."""
    header, comma, encoded = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        return None
    return inline_document_tokens(header.removeprefix("data:").removesuffix(";base64"), encoded, image_tokens)


def pdf_pages(data: bytes) -> int | None:
    """The number of pages of a PDF, or None if it cannot be read as one."""
    try:
        return len(pypdf.PdfReader(io.BytesIO(data), strict=False).pages)
    except Exception:  # pypdf raises many kinds on hostile input; any of them means "cannot read"
        return None
