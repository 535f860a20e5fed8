"""The report of a sweep: results table, scaling fits and plots, the paper's findings, the significance of the best
cells, the baselines (BM25, step 0) and the promotion of the best encoders. Called by the sweep and the CLI; it never
calls the sweep back.

    formatting    names and number formats (metric columns, dataset and metric labels)
    validation    cell and baseline records checked into typed rows
    tables        results table, baseline rows, results.csv
    fits          power-law fits
    plots         scaling plots
    markdown      the results page's tables
    scaling       write_report: results.md, results.csv, fits.json, plots/
    per_query     per-query values of the cells' runs
    statistics    bootstrap intervals and paired t-tests
    findings      the paper's three findings and their verdicts
    findings_page findings.md, findings.json and the results page's section
    significance  the best cells against BM25 and each other (retriever.evaluation.compare_runs)
    ranking       the primary metric and the best cell per paradigm
    promotion     register_best: the MLflow registry's champion per paradigm
    baselines     BM25 and step-0 encoders evaluated as the cells are
    sweep_report  write_sweep_report: all of the above for a sweep directory
"""
