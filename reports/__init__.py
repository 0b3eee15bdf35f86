"""Reports: logged runs -> one tidy DataFrame -> ablation tables and figures. Reads records only."""
