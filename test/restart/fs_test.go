package restart

import "github.com/spf13/afero"

func harnessFs(root string) afero.Fs { return afero.NewBasePathFs(afero.NewOsFs(), root) }
