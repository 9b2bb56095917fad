"""Generate the non-plain-text sample documents for engine.

Writes into engine/samples/documents/:
  * ocean_acidification_brief.pdf - a small text PDF (extractable with pypdf)
  * scanned_page_ocr_failure.txt  - a deliberately bad document (mostly noise)
    so that document quality scoring has something to reject.

Requires fpdf2 (``pip install fpdf2``). Output is deterministic apart from the
PDF's creation timestamp, which is pinned below.

Run from anywhere:  python engine/samples/make_documents.py
"""

from __future__ import annotations

import datetime as _dt
import random
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "documents"

PDF_TITLE = "Ocean Acidification: A Short Briefing"

PDF_SECTIONS: list[tuple[str, str]] = [
    (
        "What is happening",
        "The ocean has absorbed roughly a quarter to a third of the carbon dioxide released by human "
        "activity since the industrial revolution. This has slowed the build-up of the gas in the "
        "atmosphere, but it has come at a cost. When carbon dioxide dissolves in seawater it forms "
        "carbonic acid, which releases hydrogen ions and lowers the pH of the water. Average surface "
        "ocean pH has fallen from about 8.2 to about 8.1 since pre-industrial times. Because the pH "
        "scale is logarithmic, that small-looking change corresponds to an increase of roughly 30 percent "
        "in the concentration of hydrogen ions. Seawater is still alkaline, so the word acidification "
        "describes the direction of change rather than a switch to acidic conditions.",
    ),
    (
        "Why carbonate matters",
        "The extra hydrogen ions combine with carbonate ions already present in seawater to form "
        "bicarbonate. As a result, carbonate becomes scarcer. Many marine organisms, including corals, "
        "oysters, mussels, sea urchins and some plankton, build shells or skeletons from calcium "
        "carbonate, so a lower carbonate concentration makes construction more costly in energy. In "
        "strongly affected waters, unprotected shells can begin to dissolve. Laboratory and field studies "
        "show reduced growth and survival in the larvae of several shellfish species under conditions "
        "expected later this century, and some oyster hatcheries on the Pacific coast of North America "
        "have already had to monitor and adjust the chemistry of the water they draw from the sea.",
    ),
    (
        "Where it is worst",
        "Acidification is not uniform. Cold water holds more dissolved carbon dioxide, so polar seas are "
        "changing quickly, and parts of the Arctic and Southern Ocean are expected to become corrosive to "
        "some forms of calcium carbonate for part of the year within decades. Coastal upwelling zones, "
        "where deep water rich in carbon dioxide rises to the surface, also experience low pH events. "
        "Near the shore, nutrient pollution adds to the problem: algal blooms fed by fertiliser runoff "
        "eventually decay, and the decomposition releases more carbon dioxide into bottom waters.",
    ),
    (
        "Combined pressures",
        "Marine ecosystems rarely face acidification alone. The same carbon dioxide emissions are warming "
        "the ocean, causing marine heatwaves and coral bleaching, and reducing the amount of oxygen "
        "dissolved in seawater. Overfishing and habitat damage further weaken the resilience of many "
        "ecosystems. Coral reefs are especially exposed, because warming kills corals while acidification "
        "slows the growth needed for reefs to recover between disturbances.",
    ),
    (
        "What can be done",
        "The only lasting solution is to reduce carbon dioxide emissions, since ocean chemistry follows "
        "the concentration of the gas in the atmosphere. Local actions can still buy time. Cutting "
        "nutrient runoff reduces acidification in coastal waters, protecting seagrass meadows and kelp "
        "forests can raise pH locally while they photosynthesise, and shellfish farms can time their "
        "operations or treat hatchery water to protect vulnerable larvae. Continued monitoring of ocean "
        "pH and carbonate chemistry is essential to track the changes and to test which local measures "
        "actually work.",
    ),
]

BAD_HEADER = "SCAN_0042.tif -> OCR output (confidence 0.03)\n"


def make_pdf(path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(_dt.datetime(2024, 1, 1, tzinfo=_dt.UTC))
    pdf.set_title(PDF_TITLE)
    pdf.set_author("engine sample data")
    pdf.set_margins(20, 20, 20)
    pdf.add_page()
    pdf.set_font("Helvetica", style="B", size=16)
    pdf.multi_cell(0, 9, PDF_TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    for heading, body in PDF_SECTIONS:
        pdf.set_font("Helvetica", style="B", size=12)
        pdf.multi_cell(0, 7, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 6, body, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)
    pdf.output(str(path))


def make_bad_text(path: Path) -> None:
    rng = random.Random(7)
    noise_chars = "~#%&*^|\\/<>{}[]=+_0123456789lI1!;:,.'`\"@$" + "\u00a4\u00b6\u00a7\u00ac\u00bf\u00f8\u00de\u00b5"
    lines = [BAD_HEADER]
    for _ in range(40):
        words = []
        for _ in range(rng.randint(4, 12)):
            words.append("".join(rng.choice(noise_chars) for _ in range(rng.randint(1, 9))))
        lines.append(" ".join(words) + "\n")
    lines.insert(17, "w a t e r  q u a l i t y\n")
    path.write_text("".join(lines), encoding="utf-8")


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    pdf_path = DOCS / "ocean_acidification_brief.pdf"
    bad_path = DOCS / "scanned_page_ocr_failure.txt"
    make_pdf(pdf_path)
    make_bad_text(bad_path)
    print(f"wrote {pdf_path} and {bad_path}")


if __name__ == "__main__":
    main()
