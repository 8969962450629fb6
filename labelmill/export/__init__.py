"""Exports: COCO, MDETR grounding, HTML report."""
