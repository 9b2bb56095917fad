"""Pages and plots that engine writes for people: one renderer for the run report and the sweep summary.

  page.py  a page as a list of blocks, written as Markdown and as one self-contained HTML file
  plot.py  a headless matplotlib figure, and the figure as PNG bytes

Why one package below report/, sweep/ and train/: those three sit side by side in the work
layer and may not import each other, yet each writes pages or plots. Everything here takes
plain values (titles, strings, numbers) and knows nothing of runs; matplotlib is imported only
when a figure is made.
"""
