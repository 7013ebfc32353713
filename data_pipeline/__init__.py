"""SuTI apprenticeship-data pipeline (Apache Beam): web image-text pairs -> ICL groups.

Entry point: `python -m data_pipeline.build_icl_groups`; one module per stage.
"""
