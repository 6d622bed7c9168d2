"""Documents for tests, made here (nothing is downloaded): PDFs of a given number of pages."""

import io

import pypdf


def blank_pdf(pages: int) -> bytes:
    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
