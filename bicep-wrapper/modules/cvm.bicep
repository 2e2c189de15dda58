// One confidential GPU VM: AMD SEV-SNP with its guest state encrypted with the OS disk, a vTPM,
// secure boot, and a system-assigned identity that Key Vault releases the KEK to.

param location string
param namePrefix string
param vmSize string
param adminUsername string

@secure()
@description('The admin user\'s SSH public key (SSH itself stays closed unless the NSG opens it).')
param sshPublicKey string

param subnetId string
param publicIpId string

@secure()
@description('cloud-init user data (rendered by `confinfer deploy`), at most 65,535 bytes.')
param userData string

@description('Disk encryption set for customer-managed keys; empty: platform-managed keys.')
param diskEncryptionSetId string = ''

param image object

resource nic 'Microsoft.Network/networkInterfaces@2023-09-01' = {
  name: '${namePrefix}-nic'
  location: location
  properties: {
    ipConfigurations: [
      {
        name: 'primary'
        properties: {
          subnet: {
            id: subnetId
          }
          privateIPAllocationMethod: 'Dynamic'
          publicIPAddress: empty(publicIpId) ? null : {
            id: publicIpId
          }
        }
      }
    ]
  }
}

resource vm 'Microsoft.Compute/virtualMachines@2023-09-01' = {
  //checkov:skip=CKV_AZURE_97:confidential VMs do not support encryption at host; the OS disk and the VM guest state are encrypted by confidential disk encryption (DiskWithVMGuestState)
  //checkov:skip=CKV_AZURE_151:a Windows-only check; this is a Linux VM with confidential disk encryption
  name: '${namePrefix}-vm'
  location: location
  identity: {
    type: 'SystemAssigned' // the identity Key Vault's release role and the blob reader role name
  }
  properties: {
    hardwareProfile: {
      vmSize: vmSize
    }
    securityProfile: {
      securityType: 'ConfidentialVM'
      uefiSettings: {
        secureBootEnabled: true
        vTpmEnabled: true // the vTPM that holds the attestation key and the HCL report
      }
    }
    storageProfile: {
      imageReference: image
      osDisk: {
        createOption: 'FromImage'
        managedDisk: {
          storageAccountType: 'Premium_LRS'
          securityProfile: {
            // The VM guest state (vTPM included) is encrypted together with the OS disk.
            securityEncryptionType: 'DiskWithVMGuestState'
            diskEncryptionSet: empty(diskEncryptionSetId) ? null : {
              id: diskEncryptionSetId
            }
          }
        }
      }
    }
    osProfile: {
      computerName: take('${namePrefix}-vm', 15)
      adminUsername: adminUsername
      customData: base64(userData)
      linuxConfiguration: {
        disablePasswordAuthentication: true
        ssh: {
          publicKeys: [
            {
              path: '/home/${adminUsername}/.ssh/authorized_keys'
              keyData: sshPublicKey
            }
          ]
        }
      }
      allowExtensionOperations: false
    }
    networkProfile: {
      networkInterfaces: [
        {
          id: nic.id
        }
      ]
    }
  }
}

output principalId string = vm.identity.principalId
output vmName string = vm.name
