"""Input: dataset readers, image transforms, grain pipelines and the generated default dataset."""
